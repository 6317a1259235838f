"""Tests for benchmarks/gpu_check.py (`make gpu-check`) and tools/wheelhouse.py (`make wheelhouse`), on a CPU:
the smoke mode's JSON, the time limits, the offline install from a wheelhouse into a virtual environment of the
check's own, the download commands, the Makefile targets and the parsers."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

from tools import wheelhouse  # noqa: E402

STATUSES = {"ok", "partial", "failed", "skipped", "error"}


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{info}/METADATA", metadata)
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def make_wheelhouse(folder: Path, requirements: str = "gcsmall==0.1\n") -> Path:
    """A wheelhouse like `make wheelhouse` writes: wheels + requirements.txt (gcsmall needs gcdep)."""
    make_wheel(folder, "gcsmall", "0.1", requires=("gcdep>=0.2",))
    make_wheel(folder, "gcdep", "0.2")
    (folder / wheelhouse.REQUIREMENTS).write_text("# a test wheelhouse\n" + requirements)
    return folder


def _run(args: list[str], timeout: int = 300, returncode: int = 0) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT)
    assert result.returncode == returncode, result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1]) if returncode == 0 else {}
    return result, last


def _imports(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([python, "-c", code], timeout=60).returncode == 0


@pytest.fixture(scope="module")
def smoke(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    house = make_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))
    _, last = _run(["--smoke", "--data", str(sample_shards), "--out", str(out), "--wheelhouse", str(house)])
    return last, out


def test_smoke_writes_one_json_with_every_part(smoke):
    report, out = smoke
    assert json.loads((out / "gpu_check.json").read_text()) == report  # the file, and the last line printed
    assert report["smoke"] is True and set(report["parts"]) == set(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] in STATUSES, name
        assert part["seconds"] >= 0 and part["limit_s"] > 0
    assert report["elapsed_s"] < report["limit_s"]
    assert "machine" in report and "imports" in report and report["cuda"] is False
    assert report["machine"].get("packages", {}).get("torch"), report["machine"]  # droppos's run card


def test_smoke_installs_the_wheelhouse_and_runs_the_parts_with_it(smoke):
    report = smoke[0]
    install = report["parts"]["install"]
    assert install["status"] == "ok", install
    assert install["installed"] == ["gcdep-0.2", "gcsmall-0.1"] and install["install_failed"] == []
    assert "--no-index" in install["pip"]["command"] and "--find-links" in install["pip"]["command"]
    assert report["python"] == install["python"] and install["python"].startswith(install["venv"])
    # That environment sees this Python's packages (torch, from a venv here): the later parts ran with it.
    assert report["parts"]["pretrain"]["status"] == "ok"
    assert not _imports(sys.executable, "gcsmall")  # this Python is unchanged


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
    assert pretrain["environment"]["device"] == "cpu"  # what config.json says it ran with


def test_spent_limit_skips_every_part_with_a_note(tmp_path):
    _, report = _run(["--smoke", "--limit-s", "0", "--out", str(tmp_path)], timeout=120)
    for name in gpu_check.PARTS:
        part = report["parts"][name]
        assert part["status"] == "skipped" and "time limit" in part["note"], name


def test_a_missing_wheelhouse_is_one_line_and_exit_2(tmp_path):
    result, _ = _run(["--smoke", "--wheelhouse", str(tmp_path / "nowhere"), "--out", str(tmp_path)], returncode=2)
    assert "make wheelhouse" in result.stderr and "Traceback" not in result.stderr


def test_install_is_offline_into_its_own_venv_and_names_what_failed(tmp_path):
    house = make_wheelhouse(tmp_path / "house", "gcsmall==0.1\ngcmissing==1.0\n")
    venv = tmp_path / "venv"
    result = gpu_check.install_wheelhouse(house, venv, 120, tmp_path / "logs" / "install.log")
    assert result["status"] == "partial" and result["install_failed"] == ["gcmissing==1.0"], result
    assert result["installed"] == ["gcdep-0.2", "gcsmall-0.1"] and "gcmissing" in result["note"]
    assert _imports(result["python"], "gcsmall") and _imports(result["python"], "pytest")  # its own + this Python's
    assert not _imports(sys.executable, "gcsmall")
    # Again into the same environment: everything is there already.
    (house / wheelhouse.REQUIREMENTS).write_text("gcsmall==0.1\n")
    again = gpu_check.install_wheelhouse(house, venv, 120, tmp_path / "logs" / "again.log")
    assert again["status"] == "ok" and again["installed"] == [] and "nothing to install" in again["note"]
    # A folder that is no wheelhouse: said so, nothing made.
    empty = gpu_check.install_wheelhouse(tmp_path / "logs", tmp_path / "venv2", 60, tmp_path / "x.log")
    assert empty["status"] == "failed" and "make wheelhouse" in empty["error"] and not (tmp_path / "venv2").exists()


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


def test_wheelhouse_takes_the_project_pins_the_node_lacks():
    wanted = wheelhouse.plan(wheelhouse.read_requirements(ROOT / "requirements.txt"))
    names = {wheelhouse.name_of(r) for r in wanted["install"]}
    assert {"webdataset", "nvidia-dali-cuda130", "timm", "typer", "rich", "safetensors", "pytest"} <= names
    assert not names & {"torch", "torchvision", "pillow-simd", "scikit-image"}
    pins = dict(r.split("==") for r in wheelhouse.read_requirements(ROOT / "requirements.txt"))
    assert f"webdataset=={pins['webdataset']}" in wanted["resolved"]  # the project's pins, resolved
    assert wanted["no_deps"] == [f"timm=={pins['timm']}"]  # its dependencies include torch
    assert {"huggingface_hub", "pyyaml"} <= set(wanted["resolved"])  # what timm needs besides torch
    no_dali = wheelhouse.plan(wheelhouse.read_requirements(ROOT / "requirements.txt"), dali=False,
                              add=("scikit-image==0.26.0",))
    assert "nvidia-dali-cuda130" not in {wheelhouse.name_of(r) for r in no_dali["install"]}
    assert "scikit-image==0.26.0" in no_dali["install"]


def test_wheelhouse_download_command_targets_the_node():
    tags = wheelhouse.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags
    assert wheelhouse.platform_tags("macosx_14_0_arm64") == ["macosx_14_0_arm64"]
    command = wheelhouse.download_command(["typer==1"], Path("/wh"), "3.12", "manylinux_2_28_aarch64", deps=False,
                                          python="py")
    assert command[:4] == ["py", "-m", "pip", "download"] and "--only-binary=:all:" in command
    for flag, value in (("--python-version", "3.12"), ("--implementation", "cp"), ("-d", "/wh")):
        assert command[command.index(flag) + 1] == value
    assert ["--platform", "manylinux_2_28_aarch64"] == command[command.index("--platform"):][:2]
    assert "--no-deps" in command and command[-1] == "typer==1"


def test_wheelhouse_build_runs_two_downloads_and_writes_the_install_list(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(wheelhouse.subprocess, "run", lambda command, check: calls.append(command))
    wheelhouse.main(["--dest", str(tmp_path / "wh"), "--python-version", "3.11", "--no-dali"])
    assert len(calls) == 2 and "--no-deps" not in calls[0] and "--no-deps" in calls[1]
    assert all(c[c.index("--python-version") + 1] == "3.11" for c in calls)
    listed = wheelhouse.read_requirements(tmp_path / "wh" / wheelhouse.REQUIREMENTS)
    assert any(r.startswith("webdataset==") for r in listed) and not any("dali" in r for r in listed)


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _pypi_reachable(), reason="needs network to PyPI")
def test_wheelhouse_downloads_a_real_wheel_for_another_python(tmp_path):
    command = wheelhouse.download_command(["braceexpand==0.1.7"], tmp_path, "3.12", "manylinux_2_28_x86_64")
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    assert [p.name for p in tmp_path.glob("*.whl")] == ["braceexpand-0.1.7-py2.py3-none-any.whl"]


def _make_n(*args: str) -> str:
    result = subprocess.run(["make", "-n", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_targets_form_the_commands(tmp_path):
    text = _make_n("wheelhouse", f"WHEELHOUSE={tmp_path}/wh", "PYTHON_VERSION=3.11", "PLATFORM=manylinux_2_17_aarch64")
    assert "tools/wheelhouse.py" in text and f"--dest {tmp_path}/wh" in text
    assert "--python-version 3.11" in text and "--platform manylinux_2_17_aarch64" in text
    named = _make_n("gpu-check", f"WHEELHOUSE={tmp_path}/wh", "GPU_CHECK_OUT=o")
    assert "benchmarks/gpu_check.py --out o" in named and f"--wheelhouse {tmp_path}/wh" in named
    default = _make_n("gpu-check")  # the default folder only when it is there
    assert ("--wheelhouse wheelhouse" in default) == (ROOT / "wheelhouse").is_dir()


def test_verbose_lines_count_the_tests_of_a_stopped_run():
    log = ("tests/test_model.py::test_a PASSED [ 10%]\n"
           "tests/test_model.py::test_b[x-1] FAILED [ 20%]\n"
           "tests/test_data.py::test_c SKIPPED (needs CUDA) [ 30%]\n"
           "tests/test_data.py::test_d ERROR [ 40%]\n"
           "tests/test_data.py::test_e ")  # cut off while running
    counts = gpu_check.parse_verbose(log)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (1, 1, 1, 1)
    assert counts["failures"] == ["tests/test_model.py::test_b[x-1]"]
