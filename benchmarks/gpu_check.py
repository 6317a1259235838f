"""`make gpu-check`: what needs CUDA, checked and measured in one run of under 8 minutes on one H100/H200.

It runs with what such a machine has (Python 3.12, torch 2.11, timm, typer, rich, safetensors, pillow,
pytest; no webdataset, braceexpand or DALI, no package index) and writes ONE JSON summary (it also prints a
table, then the JSON as the last line). Parts, in order, each with its own time budget (`--budgets`), skipped
with a note once the total (`--budget-s`, 460 s) is spent; a failure is recorded in the JSON and never stops
the others:

  wheels    carried wheels (.gpu-wheels/carry-*/ and /tmp/droppos-wheels/, made by `make gpu-wheels`): split
            wheels joined, every sha256 checked against wheels.json, `pip install --no-index --no-deps
            --target` into a temporary folder that goes first on every part's PYTHONPATH;
  tests     `pytest -m gpu`: passed / failed / errors / skipped counts, the failures' and skips' names;
  bench     benchmarks/bench_step.py on the paper recipe: ViT-B/16 at 224, attentive pass on, bf16, compiled,
            batch 64 and 256 per GPU with the attentive pass as its own CUDA graph (compile_step), then batch 64
            with it inline for comparison: img/s, the fraction of the 989 TFLOP/s dense bf16 peak counting
            63.4 GFLOPs per image (28.3 step + 35.1 attentive, docs/METHOD.md) and of the bf16 matmul peak measured
            in the same run, peak memory, recompiles and graph breaks;
  loader    benchmarks/bench_loader.py --device cuda --backends pil[,dali] --images 4096 (DALI 'mixed' only
            where DALI imports);
  pretrain  `python -m droppos shard --sample` then a 200-step `python -m droppos pretrain --gpus 1` of a
            cpu-demo-sized model (ViT-Ti width, depth 4, 48 px, patch 8; `--pretrain-args`) with
            TORCH_LOGS=recompiles,graph_breaks: exit code, img/s from metrics.jsonl, the recompile and
            graph-break lines.

On a CPU, `--smoke` runs the same parts small (cpu-demo model, a few steps, the tests of one file), skipping
what needs CUDA with a note: tests/test_gpu_check.py runs it so.

## On the GPU machine: the device tool's `run` calls (a later session makes them)

Here first: `make gpu-wheels` (benchmarks/gpu_wheels.py: downloads ~262 MB from PyPI into the git-ignored
.gpu-wheels/ and prints these calls with the folders it made: carry-1 = webdataset + braceexpand, 0.1 MiB;
carry-2 .. carry-6 = DALI 2.4 for CUDA 13 and its dependencies, 44-55 MiB each, the 199 MB DALI wheel in 4
parts). One call carries at most 64 MiB with the working tree, so each DALI folder travels in its own call and
is staged in /tmp on the machine, which keeps it only while the machine stays warm: it is given back 30 s after
a call returns, so make the calls back to back. If one of them starts a fresh machine, the parts staged before
are gone: gpu-check then records DALI as incomplete (which parts are missing) and runs without it. The commands
call python3 directly (the machine's Python holds torch; `make gpu-check GPU_CHECK_OUT=$OUT` is the same).

Without DALI (one call; about 9 minutes of device time with the machine's start):
  run(carry=[".gpu-wheels/carry-1"], timeout_s=540,
      command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT")

With DALI (six calls; about 12 minutes: only when `status` says at least 13 minutes are left):
  run(carry=[".gpu-wheels/carry-2"], timeout_s=120,
      command="mkdir -p /tmp/droppos-wheels && cp .gpu-wheels/carry-2/* /tmp/droppos-wheels/ && ls /tmp/droppos-wheels | wc -l")
  run(carry=[".gpu-wheels/carry-3"], ...the same command with carry-3...), then carry-4 and carry-5, each at once
  run(carry=[".gpu-wheels/carry-1", ".gpu-wheels/carry-6"], timeout_s=540,
      command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT")

The last call's files come back: $OUT/gpu_check.json and $OUT/logs/*.log (the device tool returns at most 8
files: the logs are the bench runs', the loader's and pretrain's; the JSON keeps every command's last lines
too) and the JSON is the last line of the output. Then give_back. A rerun with what is left: `--parts bench`
or `--budgets bench=300`, and `--budget-s` to fit the time.
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
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # droppos is not installed on the GPU machine
from gpu_wheels import MANIFEST, sha256_file  # noqa: E402  (beside this file)

from droppos.files import write_text_atomic  # noqa: E402  (torch-free)
PARTS = ("wheels", "tests", "bench", "loader", "pretrain")
BUDGETS = {"wheels": 40.0, "tests": 90.0, "bench": 170.0, "loader": 70.0, "pretrain": 110.0}
SMOKE_BUDGETS = {"wheels": 20.0, "tests": 60.0, "bench": 90.0, "loader": 45.0, "pretrain": 120.0}
MIN_PART_S = 15.0  # a part (or one bench run) with less time left is skipped
WHEEL_DIRS = (".gpu-wheels", "/tmp/droppos-wheels")
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
    """The total budget and each part's share of what is left."""

    def __init__(self, total_s: float, budgets: dict[str, float]) -> None:
        self.start, self.total_s, self.budgets = time.monotonic(), total_s, budgets

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def budget(self, part: str) -> float:
        return min(self.budgets[part], self.left())


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
# wheels


def install_wheels(dirs: list[Path], target: Path, staging: Path, timeout_s: float, log: Path) -> dict[str, Any]:
    """Join split wheels, check every sha256 against the manifests, pip-install the complete ones into `target`."""
    present = [d for d in dirs if d.is_dir()]
    files: dict[str, Path] = {}
    manifest: dict[str, dict] = {}
    for folder in present:
        for path in sorted(folder.rglob("*")):
            if path.name == MANIFEST:
                manifest.update(_load_json(path) or {})
            elif path.is_file() and (path.suffix == ".whl" or ".whl.part-" in path.name):
                files.setdefault(path.name, path)
    if not files:
        return {"status": "skipped", "note": "no carried wheels in " + ", ".join(map(str, dirs))
                + " (`make gpu-wheels` here, then carry .gpu-wheels/carry-1)", "installed": []}
    staging.mkdir(parents=True, exist_ok=True)
    wheels: list[Path] = []
    incomplete: dict[str, str] = {}
    bad: list[str] = []
    for name, entry in manifest.items():
        parts = entry.get("parts") or []
        if name in files or not parts:
            continue
        missing = [p for p in parts if p not in files]
        if missing:
            incomplete[name] = f"{len(parts) - len(missing)} of {len(parts)} parts here (missing {', '.join(missing)})"
            continue
        joined = staging / name
        with open(joined, "wb") as out:
            for part in parts:
                with open(files[part], "rb") as src:
                    shutil.copyfileobj(src, out)
        files[name] = joined
    for name, path in sorted(files.items()):
        if not name.endswith(".whl"):
            continue
        entry = manifest.get(name)
        if entry and sha256_file(path) != entry["sha256"]:
            bad.append(name)
            continue
        wheels.append(path)
    for name, entry in manifest.items():
        if name not in files and not entry.get("parts") and entry.get("essential"):
            incomplete[name] = "not carried"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(target)]
    deadline = time.monotonic() + timeout_s
    result = run_command(pip + [str(w) for w in wheels], timeout_s, log) if wheels else None
    failed_install: list[str] = []
    if result is not None and result["returncode"] != 0:  # find which ones fail, install the others
        for wheel in wheels:
            one = run_command(pip + [str(wheel)], deadline - time.monotonic(), log.with_suffix(f".{wheel.name}.log"))
            if one["returncode"] != 0:
                failed_install.append(wheel.name)
    installed = [w.name for w in wheels if w.name not in failed_install]
    trouble = bad or failed_install or incomplete
    status = "failed" if not installed else ("partial" if trouble else "ok")
    return {"status": status, "target": str(target), "folders": [str(d) for d in present], "installed": installed,
            "incomplete": incomplete, "bad_sha256": bad, "install_failed": failed_install,
            "pip": {k: result[k] for k in ("returncode", "seconds", "tail")} if result else None,
            "note": ("DALI incomplete: " + "; ".join(f"{k}: {v}" for k, v in incomplete.items())) if incomplete else ""}


def _env_with(site: Optional[Path]) -> dict[str, str]:
    """Every part's environment: this checkout (droppos is not installed there) and the carried wheels first."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = [str(ROOT)] + ([str(site)] if site is not None else [])
    env["PYTHONPATH"] = os.pathsep.join(first + [p for p in [env.get("PYTHONPATH", "")] if p])
    return env


def probe_imports(env: dict[str, str], timeout_s: float, log: Path) -> dict[str, Optional[str]]:
    """The installed version of each optional package as the parts will find it (None: not there).

    Found, not imported (DALI's import alone takes seconds): the loader part shows whether it loads.
    """
    code = ("import importlib.metadata as m, importlib.util as u, json\n"
            "def version(module, dist):\n"
            "    try:\n        return m.version(dist) if u.find_spec(module) else None\n"
            "    except Exception:\n        return None\n"
            "print('IMPORTS', json.dumps({'webdataset': version('webdataset', 'webdataset'),"
            " 'braceexpand': version('braceexpand', 'braceexpand'),"
            " 'nvidia.dali': version('nvidia.dali', 'nvidia-dali-cuda130')}))\n")
    result = run_command([sys.executable, "-c", code], timeout_s, log, env=env)
    for line in result["tail"]:
        if line.startswith("IMPORTS "):
            return json.loads(line[len("IMPORTS "):])
    return {"webdataset": None, "braceexpand": None, "nvidia.dali": None}


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


def part_tests(args: argparse.Namespace, budget: float, env: dict[str, str], work: Path, logs: Path) -> dict:
    xml = work / "pytest-gpu.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={xml}"] + list(args.test_paths)
    result = run_command(command, budget, logs / "tests.log", env=env)
    if not xml.exists():  # stopped (time budget): the tests that finished, from the -v lines
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


def part_bench(args: argparse.Namespace, budget: float, env: dict[str, str], work: Path, logs: Path) -> dict:
    end = time.monotonic() + budget
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
            entries.append({**base, "status": "skipped", "note": f"bench time budget spent ({left:.0f} s left)"})
            continue
        out = work / f"bench-{graph}-{batch}.json"
        command = [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), *common, "--attentive", "on",
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


def part_loader(args: argparse.Namespace, budget: float, env: dict[str, str], work: Path, logs: Path,
                dali: bool) -> dict:
    device = "cpu" if args.smoke else "cuda"
    backends = "pil,dali" if dali and device == "cuda" else "pil"
    images, batch, repeats = (96, 16, 1) if args.smoke else (args.loader_images, args.loader_batch, 2)
    workers = 1 if args.smoke else max(1, (os.cpu_count() or 2))
    out = work / "loader.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_loader.py"), "--device", device, "--backends", backends,
               "--images", str(images), "--batch-size", str(batch), "--workers", str(workers), "--repeats", str(repeats),
               "--json", str(out)]
    result = run_command(command, budget, logs / "loader.log", env=env)
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
        "resolved": {k: config.get(k) for k in ("loader", "precision", "compile", "device") if k in config},
    }


def part_pretrain(args: argparse.Namespace, budget: float, env: dict[str, str], work: Path, logs: Path) -> dict:
    end = time.monotonic() + budget
    data = Path(args.data) if args.data else work / "data"
    shard = None
    if not args.data:
        shard = run_command([sys.executable, "-m", "droppos", "shard", "--sample", str(data)], budget,
                            work / "logs" / "shard.log", env=env)
        if _failed(shard):
            return {"status": "failed", "error": "shard --sample: " + _failed(shard), "shard": shard}
    run = work / "run"
    extra = shlex.split(args.pretrain_args or (SMOKE_PRETRAIN_ARGS if args.smoke else PRETRAIN_ARGS))
    command = [sys.executable, "-m", "droppos", "pretrain", "--data", str(data), "--out", str(run), *extra]
    if not args.smoke:
        command += ["--gpus", "1"]
    left = end - time.monotonic()
    if left < MIN_PART_S:
        return {"status": "skipped", "note": f"pretrain time budget spent by shard ({left:.0f} s left)", "shard": shard}
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


def machine() -> dict[str, Any]:
    card: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    try:
        from droppos import runtime

        card = runtime.run_card()
    except Exception as err:  # noqa: BLE001 - recorded, the check goes on
        card["run_card_error"] = f"{type(err).__name__}: {err}"
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
        elif name == "wheels" and part.get("installed"):
            figures = f"{len(part['installed'])} installed" + (f"; {part['note']}" if part.get("note") else "")
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
    parser.add_argument("--budget-s", type=float, default=460.0, help="total seconds for all parts")
    parser.add_argument("--budgets", default="", help="per-part seconds, e.g. bench=200,pretrain=120")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny, few steps, CUDA parts noted")
    parser.add_argument("--data", default="", help="shards to pre-train on (default: shard --sample into a temp dir)")
    parser.add_argument("--wheels", default=",".join(WHEEL_DIRS), help="comma list of carried-wheel folders")
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
    budgets = dict(SMOKE_BUDGETS if args.smoke else BUDGETS)
    for item in (i for i in args.budgets.split(",") if i.strip()):
        name, _, value = item.partition("=")
        if name.strip() not in budgets:
            parser.error(f"--budgets: unknown part {name!r}")
        budgets[name.strip()] = float(value)
    args.budgets = budgets
    args.test_paths = [p for p in args.test_paths.split(",") if p] or (["tests/test_model.py"] if args.smoke else [])
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    clock = Clock(args.budget_s, args.budgets)
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="droppos-gpu-check-"))
    report: dict[str, Any] = {
        "gpu_check": 1, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "smoke": args.smoke, "budget_s": args.budget_s, "budgets": args.budgets, "parts": {},
    }
    env = _env_with(None)
    imports: dict[str, Optional[str]] = {}

    def part(name: str, body: Callable[[float], dict]) -> None:
        if name not in args.parts:
            report["parts"][name] = {"status": "skipped", "note": "not asked for (--parts)"}
            return
        budget = clock.budget(name)
        if budget < MIN_PART_S:
            report["parts"][name] = {"status": "skipped", "note": f"total time budget spent ({clock.left():.0f} s left)"}
            return
        start = time.monotonic()
        try:
            result = body(budget)
        except Exception as err:  # noqa: BLE001 - a part's failure is recorded, the others still run
            result = {"status": "error", "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc().splitlines()[-LOG_TAIL:]}
        result["seconds"] = round(time.monotonic() - start, 2)
        result["budget_s"] = round(budget, 1)
        report["parts"][name] = result
        print(f"gpu-check: {name}: {result['status']} in {result['seconds']:.0f} s", file=sys.stderr, flush=True)

    def wheels(budget: float) -> dict:
        nonlocal env
        result = install_wheels([Path(d) if Path(d).is_absolute() else ROOT / d for d in args.wheels.split(",") if d],
                                work / "site", work / "joined", budget, work / "logs" / "wheels.log")
        if result.get("installed"):
            env = _env_with(work / "site")
            imports.update(probe_imports(env, 60.0, work / "logs" / "imports.log"))
            sys.path.insert(0, str(work / "site"))
        return result

    part("wheels", wheels)
    if not imports:
        imports.update(probe_imports(env, 60.0, work / "logs" / "imports.log"))
    report["imports"] = imports
    report["machine"] = machine()
    cuda = _cuda()
    report["cuda"] = cuda
    if not cuda and not args.smoke:
        report["note"] = "CUDA is not available: the CUDA parts will fail (use --smoke on a CPU)"
    part("tests", lambda b: part_tests(args, b, env, work, logs))
    part("bench", lambda b: part_bench(args, b, env, work, logs))
    part("loader", lambda b: part_loader(args, b, env, work, logs, dali=bool(imports.get("nvidia.dali"))))
    part("pretrain", lambda b: part_pretrain(args, b, env, work, logs))
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
