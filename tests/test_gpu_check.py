"""Tests for benchmarks/gpu_check.py (`make gpu-check`) and gpu_wheels.py, on a CPU: the smoke mode's JSON,
the time budget, the carried wheels (split, joined, checked, installed) and the parsers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402

STATUSES = {"ok", "partial", "failed", "skipped", "error"}


def make_wheel(folder: Path, name: str, version: str, payload: int) -> Path:
    """A minimal pure-Python wheel with `payload` incompressible bytes (so that it can be split)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{name}/blob.bin", os.urandom(payload))
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture(scope="module")
def carried(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two fake wheels packed like `make gpu-wheels` packs: one essential, one split into 1 KiB parts."""
    root = tmp_path_factory.mktemp("wheels")
    make_wheel(root / "download", "gcsmall", "0.1", 100)
    make_wheel(root / "download", "gcbig", "0.2", 3000)
    folders = gpu_wheels.pack(root / "download", root, ("gcsmall==0.1",), ("gcbig==0.2",),
                              chunk_mib=1 / 1024, folder_mib=2 / 1024)
    assert [f.name for f in folders][0] == "carry-1" and len(folders) >= 2
    return root


def _run(args: list[str], timeout: int = 300) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    return result, last


@pytest.fixture(scope="module")
def smoke(sample_shards: Path, carried: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    wheel_dirs = ",".join(str(p) for p in sorted(carried.glob("carry-*")))
    _, last = _run(["--smoke", "--data", str(sample_shards), "--out", str(out), "--wheels", wheel_dirs])
    return last, out


def test_smoke_writes_one_json_with_every_part(smoke):
    report, out = smoke
    assert json.loads((out / "gpu_check.json").read_text()) == report  # the file, and the last line printed
    assert report["smoke"] is True and set(report["parts"]) == set(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] in STATUSES, name
        assert part["seconds"] >= 0 and part["budget_s"] > 0
    assert report["elapsed_s"] < report["budget_s"]
    assert "machine" in report and "imports" in report and report["cuda"] is False


def test_smoke_installs_the_carried_wheels_joined(smoke):
    wheels = smoke[0]["parts"]["wheels"]
    assert wheels["status"] == "ok", wheels
    assert sorted(wheels["installed"]) == ["gcbig-0.2-py3-none-any.whl", "gcsmall-0.1-py3-none-any.whl"]
    assert wheels["incomplete"] == {} and wheels["bad_sha256"] == []


def test_smoke_runs_the_gpu_tests_which_skip_on_cpu(smoke):
    tests = smoke[0]["parts"]["tests"]
    assert tests["status"] == "ok", tests
    assert tests["failed"] == tests["errors"] == tests["passed"] == 0 and tests["skipped"] >= 2
    assert any("test_compile_step_bf16_on_cuda" in s for s in tests["skips"])


def test_smoke_bench_reports_the_step_figures(smoke):
    (run,) = smoke[0]["parts"]["bench"]["runs"]
    assert run["status"] == "ok", run
    assert run["img_per_s"] > 0 and run["recompiles"] == 0 and run["graph_breaks"] == 0
    assert run["fraction_of_989_tflops_at_63_4_gflops"] == pytest.approx(run["img_per_s"] * 63.4e9 / 989e12)
    assert run["fraction_of_measured_matmul_peak"] > 0 and run["measured_matmul_peak_tflops"] > 0


def test_smoke_loader_is_run_or_its_failure_recorded(smoke):
    loader = smoke[0]["parts"]["loader"]
    assert loader["backends"] == "pil" and "--backends" in loader["command"]
    if loader["status"] == "ok":
        assert loader["img_per_s"]
    else:  # e.g. a bench_loader.py without these flags: recorded, the later parts still ran
        assert loader["status"] == "failed" and loader["error"] and loader["tail"]
        assert smoke[0]["parts"]["pretrain"]["status"] == "ok"


def test_smoke_pretrain_runs_and_counts_compile_lines(smoke):
    pretrain = smoke[0]["parts"]["pretrain"]
    assert pretrain["status"] == "ok", pretrain.get("tail")
    assert pretrain["returncode"] == 0 and pretrain["steps"] == 4 and pretrain["img_per_s"] > 0
    assert pretrain["recompile_lines"] == 0 and pretrain["graph_break_lines"] == 0
    assert isinstance(pretrain["resolved"], dict)  # what config.json says it ran with


def test_spent_budget_skips_every_part_with_a_note(tmp_path):
    _, report = _run(["--smoke", "--budget-s", "0", "--out", str(tmp_path)], timeout=120)
    for name in gpu_check.PARTS:
        part = report["parts"][name]
        assert part["status"] == "skipped" and "budget" in part["note"], name


def test_missing_or_corrupt_parts_are_recorded_not_installed(carried, tmp_path):
    folders = sorted(carried.glob("carry-*"))
    big = [f for f in folders[1:] if any(".part-" in p.name for p in f.iterdir())]
    # Without the last folder of parts: gcbig is incomplete, gcsmall still installs.
    result = gpu_check.install_wheels(folders[:-1], tmp_path / "site", tmp_path / "joined", 60, tmp_path / "log")
    assert result["installed"] == ["gcsmall-0.1-py3-none-any.whl"] and result["status"] == "partial"
    assert "gcbig-0.2-py3-none-any.whl" in result["incomplete"] and "missing" in result["note"]
    assert (tmp_path / "site" / "gcsmall" / "__init__.py").exists()
    # A corrupted part: the joined wheel fails its sha256 and is not installed.
    bad = tmp_path / "bad"
    bad.mkdir()
    for folder in folders:
        for f in folder.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
    part = sorted(bad.glob("gcbig*.part-*"))[0]
    part.write_bytes(b"x" + part.read_bytes()[1:])
    result = gpu_check.install_wheels([bad], tmp_path / "site2", tmp_path / "joined2", 60, tmp_path / "log2")
    assert result["bad_sha256"] == ["gcbig-0.2-py3-none-any.whl"] and result["status"] == "partial"
    assert big, "the test wheel must have been split"


def test_parse_pretrain_counts_recompiles_and_takes_the_steady_rate(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 20, "img_per_s": 10.0, "pos_acc": 0.1}, {"step": 40, "img_per_s": 100.0, "pos_acc": 0.2},
        {"step": 60, "img_per_s": 120.0, "pos_acc": 0.3}, {"step": 60, "val_pos_acc": 0.25}]) + "\n")
    log = ("V1201 [0/1] [__recompiles] Recompiling function forward in /x/model.py:600\n"
           "V1201 [0/1] [__recompiles]     triggered by the following guard failure(s):\n"
           "V1201 [1/0] [__graph_breaks] Graph break in user code at /x/model.py:10\n"
           "step 20/200 loss 3.1\n")
    parsed = gpu_check.parse_pretrain(tmp_path, log)
    assert parsed["img_per_s"] == 110.0  # median after the first window (the compile)
    assert parsed["steps"] == 60 and parsed["final_pos_acc"] == 0.3 and parsed["val_pos_acc"] == 0.25
    assert parsed["recompile_lines"] == 1 and parsed["graph_break_lines"] == 1


def test_gpu_wheels_pins_dali_for_cuda13_and_packs_under_the_carry_limit(carried):
    assert "nvidia-dali-cuda130==2.4.0" in gpu_wheels.DALI and "webdataset==1.0.2" in gpu_wheels.ESSENTIAL
    manifest = json.loads((carried / "carry-1" / gpu_wheels.MANIFEST).read_text())
    big = manifest["gcbig-0.2-py3-none-any.whl"]
    assert len(big["parts"]) >= 3 and manifest["gcsmall-0.1-py3-none-any.whl"]["parts"] == []
    for folder in carried.glob("carry-*"):
        assert sum(f.stat().st_size for f in folder.iterdir() if f.name != gpu_wheels.MANIFEST) <= 2048
    joined = b"".join((next(carried.glob(f"carry-*/{p}"))).read_bytes() for p in big["parts"])
    assert gpu_wheels.sha256_file(carried / "download" / "gcbig-0.2-py3-none-any.whl") == big["sha256"]
    assert joined == (carried / "download" / "gcbig-0.2-py3-none-any.whl").read_bytes()


def test_verbose_lines_count_the_tests_of_a_stopped_run():
    log = ("tests/test_model.py::test_a PASSED [ 10%]\n"
           "tests/test_model.py::test_b[x-1] FAILED [ 20%]\n"
           "tests/test_data.py::test_c SKIPPED (needs CUDA) [ 30%]\n"
           "tests/test_data.py::test_d ERROR [ 40%]\n"
           "tests/test_data.py::test_e ")  # cut off while running
    counts = gpu_check.parse_verbose(log)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (1, 1, 1, 1)
    assert counts["failures"] == ["tests/test_model.py::test_b[x-1]"]
