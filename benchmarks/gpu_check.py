"""`make gpu-check`: the acceptance check of a CUDA machine for droppos, with ONE JSON summary.

It runs from a fresh clone on a GPU node that has Python and torch (with CUDA) and maybe no network: droppos
is not installed, the clone goes first on every part's PYTHONPATH. What the node's Python lacks (webdataset,
DALI, timm, pytest, ...) comes from a wheelhouse: `make wheelhouse` on a machine with network
(tools/wheelhouse.py), the folder copied to the node, then `make gpu-check WHEELHOUSE=DIR`. The summary goes
to OUT/gpu_check.json (a table is printed too, then the JSON as the last line), each command's output to
OUT/logs/. Parts, in order, each with its own time limit (`--limits`) so that a hang cannot stall the check,
skipped with a note once the total (`--limit-s`, 1,200 s) is spent; a failure is recorded in the JSON and never
stops the others:

  install   with `--wheelhouse DIR`: a virtual environment of the check's own (`--venv`, else a temporary one)
            that sees the node's packages (torch among them) and gets what they lack from DIR with
            `pip install --no-index --find-links DIR -r DIR/requirements.txt`; the node's Python is never
            changed. Every later part runs with that environment's python. Without a wheelhouse: skipped,
            the parts run with this Python and its packages;
  tests     `pytest -m gpu`: passed / failed / errors / skipped counts, the failures' and skips' names;
  bench     benchmarks/bench_step.py on the paper recipe: ViT-B/16 at 224, attentive pass on, bf16, compiled,
            batch 64 and 256 per GPU with the attentive pass as its own CUDA graph (compile_step), then batch 64
            with it inline for comparison: img/s, the fraction of the 989 TFLOP/s dense bf16 peak (H100/H200
            SXM) counting 63.4 GFLOPs per image (28.3 step + 35.1 attentive, docs/METHOD.md) and of the bf16
            matmul peak measured in the same run, peak memory, recompiles and graph breaks;
  loader    benchmarks/bench_loader.py --device cuda --backends pil[,dali] --images 4096 (DALI 'mixed' only
            where DALI imports);
  pretrain  `python -m droppos shard --sample` then a 200-step `python -m droppos pretrain --gpus 1` of a
            cpu-demo-sized model (ViT-Ti width, depth 4, 48 px, patch 8; `--pretrain-args`) with
            TORCH_LOGS=recompiles,graph_breaks: exit code, img/s from metrics.jsonl, the recompile and
            graph-break lines.

On a CPU, `--smoke` runs the same parts small (cpu-demo model, a few steps, the tests of one file), skipping
what needs CUDA with a note: tests/test_gpu_check.py runs it so. To rerun a part: `--parts bench`, with a longer
limit: `--limits bench=900`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a fresh clone: droppos is not installed
from droppos.files import write_text_atomic  # noqa: E402  (torch-free)
from tools.wheelhouse import REQUIREMENTS  # noqa: E402  (imports nothing but the standard library)

PARTS = ("install", "tests", "bench", "loader", "pretrain")
# Time limits (seconds): generous for one GPU; they only end a part that hangs.
LIMITS = {"install": 180.0, "tests": 240.0, "bench": 450.0, "loader": 150.0, "pretrain": 180.0}
SMOKE_LIMITS = {"install": 120.0, "tests": 60.0, "bench": 90.0, "loader": 45.0, "pretrain": 120.0}
TOTAL_LIMIT_S = 1200.0
MIN_PART_S = 15.0  # a part (or one bench run) with less time left is skipped
STEP_GFLOPS_PER_IMG = 63.4  # ViT-B/16 at 224: 28.3 step + 35.1 attentive (docs/METHOD.md)
DENSE_BF16_PEAK_TFLOPS = 989.0  # H100/H200 SXM, dense bf16
# (saliency graph, batch) of the paper recipe's step benchmark, in order of importance.
BENCH_RUNS = (("separate", 64), ("separate", 256), ("inline", 64))
PRETRAIN_ARGS = ("--model vit_tiny_patch16 --img-size 48 --patch-size 8 --depth 4 --mask-ratio 0.5 "
                 "--decoder-width 192 --decoder-depth 1 --batch-size 64 --blr 3e-3 --epochs 10 "
                 "--warmup-epochs 1 --max-steps 200 --log-every 20 --ckpt-every 1000 --eval-every 0")
SMOKE_PRETRAIN_ARGS = ("--model vit_tiny_patch16 --img-size 32 --patch-size 8 --depth 1 --mask-ratio 0.5 "
                       "--decoder-width 32 --decoder-depth 1 --batch-size 16 --epochs 2 --warmup-epochs 1 "
                       "--max-steps 4 --log-every 2 --ckpt-every 1000 --device cpu --loader pil --workers 1")
LOG_TAIL = 40  # lines of each command's output kept in the JSON


# ----------------------------------------------------------------------------------------------------------
# Time and commands


class Clock:
    """The total time limit and each part's share of what is left."""

    def __init__(self, total_s: float, limits: dict[str, float]) -> None:
        self.start, self.total_s, self.limits = time.monotonic(), total_s, limits

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def limit(self, part: str) -> float:
        return min(self.limits[part], self.left())


def run_command(command: list[str], timeout_s: float, log: Path, env: Optional[dict] = None,
                cwd: Path = ROOT) -> dict[str, Any]:
    """Run `command` with its output (stdout + stderr) in `log`; its whole process group ends at the timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "wb") as out:
        out.write(("$ " + shlex.join(command) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    return {"command": shlex.join(command), "returncode": proc.returncode, "timed_out": timed_out,
            "seconds": round(time.monotonic() - start, 2), "timeout_s": round(timeout_s, 1),
            "log": str(log), "tail": text.splitlines()[-LOG_TAIL:]}


def _failed(result: dict) -> str:
    if result["timed_out"]:
        return f"timed out after {result['timeout_s']} s"
    return f"exit code {result['returncode']}" if result["returncode"] else ""


def _load_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------
# install


def outer_site_dirs() -> list[str]:
    """The site-packages folders of this Python (a virtual environment's or conda's included)."""
    import site

    found = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    with contextlib.suppress(AttributeError):  # some embedded Pythons lack these
        found += site.getsitepackages()
    if site.ENABLE_USER_SITE:
        found.append(site.getusersitepackages())
    return [p for i, p in enumerate(found) if p not in found[:i] and Path(p).is_dir()]


def make_venv(venv: Path, timeout_s: float, log: Path) -> Path:
    """A virtual environment that sees this Python's packages (torch among them) behind its own: a `.pth` file
    lists this Python's site folders, so that a node whose torch lives in a venv or conda environment works
    too. No pip of its own: this Python's pip, seen through the same folders, installs into it, and removes
    nothing outside it. Returns its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        result = run_command([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                             timeout_s, log)
        if _failed(result):
            raise RuntimeError(f"python -m venv {venv}: {_failed(result)}: " + " ".join(result["tail"][-3:]))
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                               timeout=60).stdout.strip())
    site.mkdir(parents=True, exist_ok=True)
    (site / "_droppos_node_packages.pth").write_text("".join(f"{p}\n" for p in outer_site_dirs()))
    return python


def _version(dist: str) -> Optional[str]:
    """The version of `dist` in this Python (None: not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


_INSTALLED = re.compile(r"^Successfully installed (.+)$", re.MULTILINE)


def install_wheelhouse(wheelhouse: Path, venv: Path, timeout_s: float, log: Path) -> dict[str, Any]:
    """Install into `venv` what the wheelhouse's requirements.txt lists and this Python lacks; offline.

    When the whole set fails (e.g. one wheel missing from the folder), each requirement is tried alone, so
    that the others are still there and the JSON names the one that failed."""
    requirements = wheelhouse / REQUIREMENTS
    if not requirements.is_file():
        return {"status": "failed", "error": f"{requirements} not found: make the folder with "
                "`make wheelhouse WHEELHOUSE=DIR` on a machine with network", "installed": []}
    deadline = time.monotonic() + timeout_s
    python = make_venv(venv, timeout_s, log.with_suffix(".venv.log"))
    pip = [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
           "--disable-pip-version-check", "--no-cache-dir", "--progress-bar", "off"]
    result = run_command(pip + ["-r", str(requirements)], deadline - time.monotonic(), log)
    logs = [result]
    failed: list[str] = []
    if result["returncode"] != 0:
        lines = [line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines()]
        for index, requirement in enumerate(line for line in lines if line):
            one = run_command(pip + [requirement], deadline - time.monotonic(), log.with_suffix(f".{index}.log"))
            logs.append(one)
            if one["returncode"] != 0:
                failed.append(requirement)
    installed = sorted({name for r in logs for m in _INSTALLED.finditer(Path(r["log"]).read_text(errors="replace"))
                        for name in m.group(1).split()})
    stock_pillow = [n for n in installed if n.lower().startswith("pillow-")] if _version("pillow-simd") else []
    if stock_pillow:  # a dependency's Pillow would shadow this Python's Pillow-SIMD
        run_command([str(python), "-m", "pip", "uninstall", "-y", "pillow"], 60.0, log.with_suffix(".pillow.log"))
        installed = [n for n in installed if n not in stock_pillow]
    status = "ok" if not failed else ("failed" if len(failed) == len(logs) - 1 else "partial")
    return {"status": status, "wheelhouse": str(wheelhouse), "venv": str(venv), "python": str(python),
            "installed": installed, "install_failed": failed,
            "pip": {k: result[k] for k in ("command", "returncode", "seconds", "tail")},
            "note": "; ".join(filter(None, [
                ("not installed: " + ", ".join(failed)) if failed else "",
                "" if installed or failed else "nothing to install: this Python has every requirement",
                "" if not stock_pillow else "this Python's Pillow-SIMD kept (a dependency's stock Pillow removed)"]))}


def parts_env() -> dict[str, str]:
    """Every part's environment: this clone first on PYTHONPATH (droppos is not installed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH", "")] if p])
    return env


OPTIONAL = {"webdataset": "webdataset", "braceexpand": "braceexpand", "nvidia.dali": "nvidia-dali-cuda130",
            "timm": "timm", "pytest": "pytest"}


def probe_imports(python: str, env: dict[str, str], timeout_s: float, log: Path) -> dict[str, Optional[str]]:
    """The installed version of each optional package as the parts will find it (None: not there).

    Found, not imported (DALI's import alone takes seconds): the loader part shows whether it loads.
    """
    code = ("import importlib.metadata as m, importlib.util as u, json\n"
            "def version(module, dist):\n"
            "    try:\n        return m.version(dist) if u.find_spec(module) else None\n"
            "    except Exception:\n        return None\n"
            f"print('IMPORTS', json.dumps({{k: version(k, d) for k, d in {OPTIONAL!r}.items()}}))\n")
    result = run_command([python, "-c", code], timeout_s, log, env=env)
    for line in result["tail"]:
        if line.startswith("IMPORTS "):
            return json.loads(line[len("IMPORTS "):])
    return dict.fromkeys(OPTIONAL)


# ----------------------------------------------------------------------------------------------------------
# tests


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and names from pytest's JUnit XML."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, errors, skipped = [], [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for child in case:
            message = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
            if child.tag == "failure":
                failed.append(f"{name}: {message}")
            elif child.tag == "error":
                errors.append(f"{name}: {message}")
            elif child.tag == "skipped":
                skipped.append(f"{name}: {message}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"passed": passed, "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "failures": failed, "error_names": errors, "skips": skipped}


_VERBOSE_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def parse_verbose(log_text: str) -> dict[str, Any]:
    """What `pytest -v` printed test by test: the counts when pytest was stopped before its report."""
    outcomes = {m.group(1): m.group(2) for m in map(_VERBOSE_OUTCOME.match, log_text.splitlines()) if m}
    names = {k: [n for n, o in outcomes.items() if o == k] for k in ("FAILED", "ERROR", "SKIPPED")}
    return {"passed": sum(o in ("PASSED", "XFAIL", "XPASS") for o in outcomes.values()),
            "failed": len(names["FAILED"]), "errors": len(names["ERROR"]), "skipped": len(names["SKIPPED"]),
            "failures": names["FAILED"], "error_names": names["ERROR"], "skips": names["SKIPPED"]}


def part_tests(args: argparse.Namespace, limit: float, env: dict[str, str], work: Path, logs: Path) -> dict:
    xml = work / "pytest-gpu.xml"
    command = [args.python, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={xml}"] + list(args.test_paths)
    result = run_command(command, limit, logs / "tests.log", env=env)
    if not xml.exists():  # stopped (time limit): the tests that finished, from the -v lines
        counts = parse_verbose(Path(result["log"]).read_text(errors="replace"))
        return {"status": "failed", "error": _failed(result) or "pytest wrote no report",
                "note": "counts from pytest -v's lines (pytest was stopped before its report)", **counts, **result}
    counts = parse_junit(xml)
    ok = not (result["timed_out"] or counts["failed"] or counts["errors"]) and result["returncode"] in (0, 5)
    return {"status": "ok" if ok else "failed", **counts, **result,
            "note": "no CUDA here: every gpu test skips" if not _cuda() else ""}


# ----------------------------------------------------------------------------------------------------------
# bench


def bench_entry(summary: Optional[dict]) -> dict[str, Any]:
    """The figures of one bench_step.py configuration, with the fractions of the paper's peak."""
    rows = (summary or {}).get("results") or []
    if not rows:
        return {"error": "bench_step.py wrote no result"}
    row = rows[0]
    if "error" in row:
        return {"error": row["error"]}
    peak = (summary.get("gemm_peaks") or {}).get(row["dtype"])
    return {
        "img_per_s": row["img_per_s"], "step_s": row["step_s"], "first_step_s": row["first_step_s"],
        "gflops_per_img": row["gflops_per_img"],
        "fraction_of_989_tflops_at_63_4_gflops": row["img_per_s"] * STEP_GFLOPS_PER_IMG * 1e9
        / (DENSE_BF16_PEAK_TFLOPS * 1e12),
        "fraction_of_measured_matmul_peak": row["peak_fraction"],
        "measured_matmul_peak_tflops": peak / 1e12 if peak else None,
        "peak_memory_gib": row["peak_memory_bytes"] / 2 ** 30 if row.get("peak_memory_bytes") else None,
        "recompiles": row["recompiles"], "graphs": row["graphs"], "graph_breaks": row["graph_breaks"],
        "device_name": summary.get("device_name"),
    }


def part_bench(args: argparse.Namespace, limit: float, env: dict[str, str], work: Path, logs: Path) -> dict:
    end = time.monotonic() + limit
    if args.smoke:
        common = ["--preset", "cpu-demo", "--device", "cpu", "--dtypes", "fp32", "--modes", "eager", "--steps", "1",
                  "--warmup", "0", "--gemm-sizes", "1024"]
        runs = [("separate", 8)]
    else:
        common = ["--model", "droppos_vit_base_patch16", "--img-size", "224", "--device", "cuda", "--dtypes", "bf16",
                  "--modes", "compiled", "--steps", "10", "--warmup", "3", "--gemm-sizes", "8192"]
        runs = list(BENCH_RUNS)
    entries = []
    for graph, batch in runs:
        left = end - time.monotonic()
        base = {"model": common[1], "saliency_graph": graph, "batch_size": batch}
        if left < MIN_PART_S:
            entries.append({**base, "status": "skipped", "note": f"bench time limit spent ({left:.0f} s left)"})
            continue
        out = work / f"bench-{graph}-{batch}.json"
        command = [args.python, str(ROOT / "benchmarks" / "bench_step.py"), *common, "--attentive", "on",
                   "--saliency-graph", graph, "--batch-sizes", str(batch), "--no-attentive-pass", "--no-gemm-ceiling",
                   "--json", str(out)]
        result = run_command(command, left, logs / f"bench-{graph}-{batch}.log", env=env)
        entry = bench_entry(_load_json(out))
        failure = _failed(result) or entry.get("error", "")
        entries.append({**base, "status": "failed" if failure else "ok", **({"error": failure} if failure else {}),
                        **entry, **{k: result[k] for k in ("command", "returncode", "seconds", "timed_out", "log")},
                        **({"tail": result["tail"]} if failure else {})})
    status = "ok" if all(e["status"] == "ok" for e in entries) else \
        ("failed" if any(e["status"] == "failed" for e in entries) else "partial")
    return {"status": status, "runs": entries}


# ----------------------------------------------------------------------------------------------------------
# loader


def part_loader(args: argparse.Namespace, limit: float, env: dict[str, str], work: Path, logs: Path,
                dali: bool) -> dict:
    device = "cpu" if args.smoke else "cuda"
    backends = "pil,dali" if dali and device == "cuda" else "pil"
    images, batch, repeats = (96, 16, 1) if args.smoke else (args.loader_images, args.loader_batch, 2)
    workers = 1 if args.smoke else max(1, (os.cpu_count() or 2))
    out = work / "loader.json"
    command = [args.python, str(ROOT / "benchmarks" / "bench_loader.py"), "--device", device, "--backends", backends,
               "--images", str(images), "--batch-size", str(batch), "--workers", str(workers), "--repeats", str(repeats),
               "--json", str(out)]
    result = run_command(command, limit, logs / "loader.log", env=env)
    found = _load_json(out)
    failure = _failed(result) or ("" if found is not None else "bench_loader.py wrote no JSON")
    rates = {k: v for k, v in (found or {}).items() if isinstance(v, (int, float)) and k.endswith("img_per_s")}
    notes = [] if dali else ["DALI is not importable: Pillow only"]
    return {"status": "failed" if failure else "ok", **({"error": failure} if failure else {}), "backends": backends,
            "images": images, "batch_size": batch, "workers": workers, "img_per_s": rates, "result": found,
            **result, "note": "; ".join(notes)}


# ----------------------------------------------------------------------------------------------------------
# pretrain


_RECOMPILE = re.compile(r"Recompiling function")
_GRAPH_BREAK = re.compile(r"Graph break", re.IGNORECASE)


def parse_pretrain(run: Path, log_text: str) -> dict[str, Any]:
    """img/s from metrics.jsonl (median after the first log window, which holds the compile) and the
    recompile and graph-break lines that TORCH_LOGS printed."""
    records = []
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    rates = [r["img_per_s"] for r in records if "img_per_s" in r]
    steady = rates[1:] or rates
    lines = log_text.splitlines()
    recompiles = [line for line in lines if _RECOMPILE.search(line)]
    breaks = [line for line in lines if _GRAPH_BREAK.search(line) and not _RECOMPILE.search(line)]
    config = _load_json(run / "config.json") or {}
    return {
        "img_per_s": statistics.median(steady) if steady else None, "img_per_s_windows": rates,
        "steps": max((r.get("step", 0) for r in records), default=0),
        "final_pos_acc": next((r["pos_acc"] for r in reversed(records) if "pos_acc" in r), None),
        "val_pos_acc": next((r["val_pos_acc"] for r in reversed(records) if "val_pos_acc" in r), None),
        "recompile_lines": len(recompiles), "graph_break_lines": len(breaks),
        "recompile_examples": recompiles[:5], "graph_break_examples": breaks[:5],
        "environment": config.get("environment") or {},  # what every `auto` became
    }


def part_pretrain(args: argparse.Namespace, limit: float, env: dict[str, str], work: Path, logs: Path) -> dict:
    end = time.monotonic() + limit
    data = Path(args.data) if args.data else work / "data"
    shard = None
    if not args.data:
        shard = run_command([args.python, "-m", "droppos", "shard", "--sample", str(data)], limit,
                            work / "logs" / "shard.log", env=env)
        if _failed(shard):
            return {"status": "failed", "error": "shard --sample: " + _failed(shard), "shard": shard}
    run = work / "run"
    extra = shlex.split(args.pretrain_args or (SMOKE_PRETRAIN_ARGS if args.smoke else PRETRAIN_ARGS))
    command = [args.python, "-m", "droppos", "pretrain", "--data", str(data), "--out", str(run), *extra]
    if not args.smoke:
        command += ["--gpus", "1"]
    left = end - time.monotonic()
    if left < MIN_PART_S:
        return {"status": "skipped", "note": f"pretrain time limit spent by shard ({left:.0f} s left)", "shard": shard}
    result = run_command(command, left, logs / "pretrain.log", env=dict(env, TORCH_LOGS="recompiles,graph_breaks"))
    parsed = parse_pretrain(run, Path(result["log"]).read_text(errors="replace"))
    failure = _failed(result)
    return {"status": "failed" if failure else "ok", **({"error": failure} if failure else {}), **parsed,
            **result, "shard_seconds": shard["seconds"] if shard else None, "data": str(data)}


# ----------------------------------------------------------------------------------------------------------
# The whole


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def machine(python: str, env: dict[str, str], log: Path) -> dict[str, Any]:
    """droppos's run card (package versions, hardware) as the parts' python sees it, and nvidia-smi's view."""
    card: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    code = "import json; from droppos import environment; print('CARD', json.dumps(environment.run_card(), default=str))"
    result = run_command([python, "-c", code], 120.0, log, env=env)
    found = [line for line in result["tail"] if line.startswith("CARD ")]
    if found:
        card = json.loads(found[-1][len("CARD "):])
    else:  # recorded, the check goes on
        card["run_card_error"] = _failed(result) or "no card printed"
        card["run_card_tail"] = result["tail"][-5:]
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        card["nvidia_smi"] = smi.stdout.strip().splitlines()
    return card


def _table(report: dict) -> str:
    """One line per part (and per bench run): what a person reads before the JSON."""
    lines = [f"{'part':<22} {'status':<8} {'seconds':>8}  figures"]
    parts = report["parts"]
    for name in PARTS:
        part = parts.get(name, {})
        figures = part.get("note") or part.get("error") or ""
        if name == "tests" and "passed" in part:
            figures = (f"{part['passed']} passed, {part['failed']} failed, {part['errors']} errors, "
                       f"{part['skipped']} skipped") + (f"; {part['note']}" if part.get("note") else "")
        elif name == "loader" and part.get("img_per_s"):
            figures = ", ".join(f"{k} {v:.0f}" for k, v in part["img_per_s"].items())
        elif name == "pretrain" and part.get("img_per_s"):
            figures = (f"{part['img_per_s']:.0f} img/s, {part['steps']} steps, exit {part['returncode']}, "
                       f"{part['recompile_lines']} recompile / {part['graph_break_lines']} graph-break lines")
        elif name == "install" and part.get("python"):
            figures = (f"{len(part['installed'])} installed into {part['venv']}"
                       + (f"; {part['note']}" if part.get("note") else ""))
        lines.append(f"{name:<22} {part.get('status', '-'):<8} {part.get('seconds', 0.0):>8.1f}  {figures}")
        for run in part.get("runs", []):
            label = f"  {run['saliency_graph']} b{run['batch_size']}"
            text = run.get("note") or run.get("error") or ""
            if run.get("img_per_s"):
                text = (f"{run['img_per_s']:.0f} img/s, {run['fraction_of_989_tflops_at_63_4_gflops']:.1%} of 989 TFLOP/s, "
                        f"{run['fraction_of_measured_matmul_peak']:.1%} of measured, first step "
                        f"{run['first_step_s']:.0f} s, recompiles {run['recompiles']}"
                        + (f", {run['peak_memory_gib']:.1f} GiB" if run.get("peak_memory_gib") else ""))
            lines.append(f"{label:<22} {run['status']:<8} {run.get('seconds', 0.0):>8.1f}  {text}")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-check-out", help="folder for gpu_check.json and logs/")
    parser.add_argument("--json", default="", help="the summary file (default: OUT/gpu_check.json)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    parser.add_argument("--limit-s", type=float, default=TOTAL_LIMIT_S, help="total seconds for all parts")
    parser.add_argument("--limits", default="", help="per-part seconds, e.g. bench=900,pretrain=300")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny, few steps, CUDA parts noted")
    parser.add_argument("--data", default="", help="shards to pre-train on (default: shard --sample into a temp dir)")
    parser.add_argument("--wheelhouse", default="", help="a folder made by `make wheelhouse`: install what this "
                        "Python lacks from it (offline) into a virtual environment of the check's own")
    parser.add_argument("--venv", default="", help="that virtual environment (default: a temporary one; "
                        "an existing one is reused)")
    parser.add_argument("--test-paths", default="", help="what pytest collects (default: the project's tests)")
    parser.add_argument("--pretrain-args", default="", help="pretrain options (default: the cpu-demo-sized model)")
    parser.add_argument("--loader-images", type=int, default=4096)
    parser.add_argument("--loader-batch", type=int, default=64)
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary work folder (data, runs)")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    limits = dict(SMOKE_LIMITS if args.smoke else LIMITS)
    for item in (i for i in args.limits.split(",") if i.strip()):
        name, _, value = item.partition("=")
        if name.strip() not in limits:
            parser.error(f"--limits: unknown part {name!r}")
        try:
            limits[name.strip()] = float(value)
        except ValueError:
            parser.error(f"--limits: {item!r} is not PART=SECONDS")
    args.limits = limits
    if args.wheelhouse and not Path(args.wheelhouse).is_dir():
        parser.error(f"--wheelhouse: {args.wheelhouse} is not a folder (make it with `make wheelhouse` on a "
                     "machine with network, then copy it here)")
    args.python = sys.executable  # the parts' python; the install part replaces it with its environment's
    args.test_paths = [p for p in args.test_paths.split(",") if p] or (["tests/test_model.py"] if args.smoke else [])
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    clock = Clock(args.limit_s, args.limits)
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="droppos-gpu-check-"))
    report: dict[str, Any] = {
        "gpu_check": 2, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "smoke": args.smoke, "limit_s": args.limit_s, "limits": args.limits, "parts": {},
    }
    env = parts_env()

    def part(name: str, body: Callable[[float], dict]) -> None:
        if name not in args.parts:
            report["parts"][name] = {"status": "skipped", "note": "not asked for (--parts)"}
            return
        limit = clock.limit(name)
        if limit < MIN_PART_S:
            report["parts"][name] = {"status": "skipped", "note": f"total time limit spent ({clock.left():.0f} s left)"}
            return
        start = time.monotonic()
        try:
            result = body(limit)
        except Exception as err:  # noqa: BLE001 - a part's failure is recorded, the others still run
            result = {"status": "error", "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc().splitlines()[-LOG_TAIL:]}
        result["seconds"] = round(time.monotonic() - start, 2)
        result["limit_s"] = round(limit, 1)
        report["parts"][name] = result
        print(f"gpu-check: {name}: {result['status']} in {result['seconds']:.0f} s", file=sys.stderr, flush=True)

    def install(limit: float) -> dict:
        if not args.wheelhouse:
            return {"status": "skipped", "note": "no --wheelhouse: the parts run with this Python's packages",
                    "installed": []}
        venv = Path(args.venv) if args.venv else work / "venv"
        result = install_wheelhouse(Path(args.wheelhouse).resolve(), venv.resolve(), limit, logs / "install.log")
        if result.get("python"):
            args.python = result["python"]
        return result

    part("install", install)
    report["python"] = args.python
    report["imports"] = probe_imports(args.python, env, 60.0, work / "logs" / "imports.log")
    report["machine"] = machine(args.python, env, work / "logs" / "machine.log")
    cuda = _cuda()
    report["cuda"] = cuda
    if not cuda and not args.smoke:
        report["note"] = "CUDA is not available: the CUDA parts will fail (use --smoke on a CPU)"
    part("tests", lambda t: part_tests(args, t, env, work, logs))
    part("bench", lambda t: part_bench(args, t, env, work, logs))
    part("loader", lambda t: part_loader(args, t, env, work, logs, dali=bool(report["imports"].get("nvidia.dali"))))
    part("pretrain", lambda t: part_pretrain(args, t, env, work, logs))
    report["elapsed_s"] = round(clock.elapsed(), 1)
    report["work"] = str(work) if args.keep_work else None
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    target = Path(args.json) if args.json else out / "gpu_check.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, default=str)
    write_text_atomic(target, text + "\n")
    print(_table(report))
    print(f"gpu-check: {report['elapsed_s']:.0f} s in all; summary in {target}")
    print(text)
    return report


if __name__ == "__main__":
    main()
