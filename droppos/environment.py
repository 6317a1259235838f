"""Everything `auto` resolved once, in the launching process, into one record: the `Environment`.

Device, precision, compile, input pipeline and loader workers, processes per node and world size are
decided here from the options and the machine, before any worker starts; the workers receive the
record, config.json's `environment` and the start-up line show it, and nothing is decided again later.
The run card (what produced a result: versions, commit, hardware) lives here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from droppos import UserError
from droppos.recipes import DEVICES, PRECISIONS, DataOptions, LaunchOptions


@dataclass(frozen=True)
class Environment:
    """What a training run runs on and with, every `auto` resolved."""

    device: str  # "cuda" | "cpu"
    precision: str  # "bf16" | "fp32"
    compile: bool
    loader: str  # "dali" | "pil"
    workers: int  # per process: DALI threads or Pillow loader processes
    processes_per_node: int
    world_size: int

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (f"{self.device} {self.precision} {'compiled' if self.compile else 'eager'} loader {self.loader}, "
                f"world size {self.world_size}")


def resolve(launch: LaunchOptions, data: DataOptions, mode: str, masks: bool = False) -> Environment:
    """The environment of a training stage whose training data is read in `mode` (with label maps: `masks`)."""
    from droppos.data import resolve_backend

    device = resolve_device(launch.device, launch.gpus)
    per_node = launch.gpus if launch.gpus else (1 if device == "cuda" else launch.nproc)
    world = per_node * launch.nnodes
    if launched_externally():
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])
    workers = max(1, usable_cores() // max(1, per_node)) if data.workers is None else data.workers
    return Environment(device=device, precision=resolve_precision(launch.precision, device),
                       compile=launch.compile if launch.compile is not None else device == "cuda",
                       loader=resolve_backend(data.loader, device, mode, masks=masks), workers=workers,
                       processes_per_node=per_node, world_size=world)


def launched_externally() -> bool:
    """True when torchrun (or an elastic agent) or a multi-task SLURM step started us."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_device(device: str, gpus: int = 0) -> str:
    """'auto' -> 'cuda' when CUDA is there, else 'cpu'; checks --gpus against what exists."""
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device not in DEVICES or device == "auto":
        raise UserError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not has_cuda:
        raise UserError("--device cuda (or --gpus) but CUDA is not available here; use --device cpu [--nproc N]")
    if gpus:
        if not has_cuda:
            raise UserError(f"--gpus {gpus} but CUDA is not available here; use --device cpu --nproc N instead")
        if device != "cuda":
            raise UserError("--gpus needs --device cuda (or auto)")
        if gpus > torch.cuda.device_count():
            raise UserError(f"--gpus {gpus} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> bf16 on CUDA, fp32 on a CPU (where bf16 autocast does not pay: README, benchmarks)."""
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    if precision not in PRECISIONS or precision == "auto":
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def prepare(device: torch.device) -> None:
    """A worker's process-wide numerics: TF32 allowed on CUDA (matmul and cuDNN)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------
# Run card: what produced a result


def _package_version(name: str) -> Optional[str]:
    import importlib.metadata as metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """The commit of the droppos checkout this code runs from ('+dirty' with local changes); None outside git."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def file_sha256(path: Path) -> Optional[str]:
    """The file's sha256, None when it cannot be read (a run card records what it can)."""
    from droppos import files

    try:
        return files.file_sha256(path)
    except OSError:
        return None


def run_card(world_size: int = 1, data_dir: Optional[str] = None) -> dict[str, Any]:
    """What produced a run or a report: package versions, the project's version and commit, the
    hardware, the world size and the data manifest's sha256 (recorded in config.json and report.json)."""
    import droppos

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    dali = next((f"{name} {v}" for name in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")
                 if (v := _package_version(name))), None)
    pil = next((f"{name} {v}" for name in ("pillow-simd", "pillow") if (v := _package_version(name))), None)
    card: dict[str, Any] = {
        "droppos": droppos.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "packages": {name: _package_version(name) for name in (
            "torch", "torchvision", "timm", "webdataset", "safetensors", "numpy")} | {"dali": dali, "pil": pil},
        "hardware": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": usable_cores(),
            "gpus": gpus,
            "gpu_count": len(gpus),
            "cuda": torch.version.cuda if gpus else None,
        },
        "host": platform.node(),
        "world_size": world_size,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if data_dir:
        from droppos.manifest import MANIFEST_NAME

        card["data_manifest_sha256"] = file_sha256(Path(data_dir) / MANIFEST_NAME)
    return card
