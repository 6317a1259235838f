"""The runtime every training stage shares: launch, device and precision, compile,
checkpoints, metrics, progress and signals.

Launch follows torchrun's model: `--gpus N` (or `--nproc N` on the CPU) starts N
worker processes through torch's elastic launcher; a process that torchrun or SLURM
already started is recognised (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS) and runs
as one worker. Only rank 0 prints, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from droppos import UserError
from droppos.files import write_text_atomic
from droppos.recipes import DEVICES, PRECISIONS


# ---------------------------------------------------------------------------------------
# Processes

WORKER_ERRORS = "DROPPOS_WORKER_ERRORS"  # the folder where launched workers leave a user mistake's message
# How long the launcher lets workers finish after it forwarded a signal (rank 0 writing a multi-GB checkpoint)
# or after a rank failed (the others, stuck in a collective with NCCL, are then killed this much later).
SHUTDOWN_TIMEOUT_S = 120


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among all workers and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_externally() -> bool:
    """True when torchrun (or an elastic agent) or a multi-task SLURM step started us."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def _adopt_slurm_env() -> None:
    """Translate a SLURM task's variables into torch.distributed's env:// variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "")
        first = ""
        if nodes and shutil.which("scontrol"):
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
            first = out.stdout.split("\n", 1)[0].strip()
        if not first:
            raise UserError("running under SLURM without MASTER_ADDR: export MASTER_ADDR=<first node> (and MASTER_PORT)")
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", "29500")


def resolve_device(device: str, gpus: int) -> str:
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


def check_out_dir(out: str) -> Path:
    """The run directory a stage writes to: required, and not an existing file."""
    if not out:
        raise UserError("--out is required: the run directory (it is created, or resumed if it exists)")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; give a directory")
    return path


def check_train_data(data: str, step_batch: int, world: int, need_val: str = "") -> dict:
    """Load the manifest and check that one step's batch fits the train split.

    `step_batch` is the per-process batch of one optimizer step (batch x accum); `need_val`
    names why the val split is required (empty: optional). Returns the manifest.
    """
    from droppos import manifest

    if not data:
        raise UserError("--data is required: a dataset directory written by `droppos shard`")
    loaded = manifest.load_manifest(Path(data))
    num_train = sum(s.num_samples for s in manifest.split_shards(Path(data), "train", loaded))
    if need_val and "val" not in loaded["splits"]:
        raise UserError(f"{data} has no val split: {need_val}")
    if num_train < step_batch * world:
        raise UserError(
            f"the train split has {num_train} samples, fewer than one step needs "
            f"({step_batch} per process x {world} processes); lower --batch-size"
        )
    return loaded


def plan_processes(device: str, gpus: int, nproc: int, nnodes: int) -> tuple[int, int]:
    """(processes to start on this node, world size): one per GPU, `nproc` on the CPU."""
    per_node = gpus if gpus else (1 if device == "cuda" else nproc)
    world = per_node * nnodes
    if launched_externally():
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    return per_node, world


def run_id_for(tag: str, out: Path) -> str:
    """A rendezvous id every node derives alike from the same command."""
    return f"droppos-{tag}-" + hashlib.sha1(str(out).encode()).hexdigest()[:12]


def check_all(checks: list[tuple[bool, str]]) -> None:
    """Stop at the first failed (condition, message) check with its one-line message."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def holds_output_lock(node_rank: int) -> bool:
    """Whether this process takes the output directory's lock: the launching process of node 0, or
    global rank 0 of a run that torchrun or SLURM started."""
    if launched_externally():
        return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
    return node_rank == 0


def start(stage: str, worker: Callable[[dict], Any], config: Any, out: Path, *, step_batch: int,
          need_val: str = "") -> None:
    """What every training stage does once its own options are checked: pick the device, plan the
    processes, check the data fits a step, lock OUT, refuse a checkpoint of other options, launch.

    `config` is the stage's recipe (a LaunchOptions dataclass); the workers get it as a dict plus
    the resolved device.
    """
    from droppos.files import OutputLock, remove_stale_temporaries

    if config.nnodes > 1 and not config.rdzv_endpoint and not launched_externally():
        raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    device = resolve_device(config.device, config.gpus)
    nproc, world = plan_processes(device, config.gpus, config.nproc, config.nnodes)
    check_train_data(config.data, step_batch, world, need_val=need_val)
    lock = OutputLock(out, stage) if holds_output_lock(config.node_rank) else contextlib.nullcontext()
    with lock:
        for folder in (out, out / "checkpoints"):
            remove_stale_temporaries(folder)  # left by a killed run (we hold the lock: nobody writes them)
        check_resumable(out, config, stage, world)
        launch(worker, dict(dataclasses.asdict(config), device=device), nproc_per_node=nproc, nnodes=config.nnodes,
               node_rank=config.node_rank, rdzv_endpoint=config.rdzv_endpoint, run_id=run_id_for(stage, out))


def launch(
    entry: Callable[[dict], Any],
    payload: dict,
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str = "",
    run_id: str = "",
) -> None:
    """Run `entry(payload)` in every worker: here, or in N processes via elastic launch.

    `entry` must be a module-level function (workers import it by name).
    """
    if launched_externally() or (nproc_per_node <= 1 and nnodes <= 1):
        entry(payload)
        return
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nnodes > 1 and not rdzv_endpoint:
        raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    share_cpus(nproc_per_node)
    errors = tempfile.mkdtemp(prefix="droppos-errors-")
    os.environ[WORKER_ERRORS] = errors  # the workers inherit it (run_worker)
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc_per_node,
        run_id=run_id or str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint=rdzv_endpoint or "localhost:0",
        rdzv_configs={"is_host": node_rank == 0} if rdzv_endpoint else {},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        # After forwarding a signal (or after one worker's exit) the agent kills what still runs this much later:
        # long enough for rank 0 to write a large checkpoint (its default, 30 s, is not).
        **({"shutdown_timeout": SHUTDOWN_TIMEOUT_S} if "shutdown_timeout" in LaunchConfig.__dataclass_fields__ else {}),
    )
    try:
        elastic_launch(config, _elastic_entry)(entry.__module__, entry.__qualname__, payload)
    except SignalException as err:
        # SIGTERM/SIGINT reached the launcher: it forwarded the signal to the workers, which stopped at their next
        # agreed (log) step with a checkpoint and said so; exit as they did. Other signals it forwards (SIGHUP,
        # SIGQUIT) end the workers without one.
        if err.sigval in (signal.SIGTERM, signal.SIGINT):
            raise SystemExit(130 if err.sigval == signal.SIGINT else 143) from None
        name = signal.Signals(err.sigval).name
        print(f"droppos: error: stopped by {name}: the workers ended without a new checkpoint (SIGTERM or Ctrl-C "
              "saves one); re-run the same command to resume from the last one", file=sys.stderr)
        raise SystemExit(128 + int(err.sigval)) from None
    except ChildFailedError as err:
        reported = [text for path in sorted(Path(errors).glob("rank-*.txt"))
                    if (text := path.read_text(encoding="utf-8", errors="replace").strip())]
        if reported:  # a user mistake a worker found: the lowest rank's message, once
            raise UserError(reported[0]) from None
        failures = err.failures
        first = failures[min(failures)] if failures else None
        if first is not None and first.exitcode in (130, 143):
            raise SystemExit(first.exitcode) from None  # stopped by a signal: rank 0 said where it saved
        detail = f" (rank {first.local_rank}: exit code {first.exitcode})" if first is not None else ""
        raise SystemExit(f"droppos: error: a worker process failed{detail}; its output is above") from None
    finally:
        os.environ.pop(WORKER_ERRORS, None)
        shutil.rmtree(errors, ignore_errors=True)


def share_cpus(processes: int) -> None:
    """Give each of `processes` workers its share of this node's cores, for OpenMP (intra-op threads)
    and for inductor's compile workers, unless the user set them: 8 ranks must not each start a
    thread and a compile worker per core. Children inherit the environment."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = str(max(1, cores // max(1, processes)))
    os.environ.setdefault("OMP_NUM_THREADS", share)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", share)


def _elastic_entry(module: str, name: str, payload: dict) -> None:
    """What each launched worker runs: import the stage's entry by name and call it."""
    getattr(importlib.import_module(module), name)(payload)


def init_distributed(device: str) -> DistInfo:
    """Join the process group (NCCL on CUDA, gloo on CPU) when there is more than one worker."""
    _adopt_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        # A SLURM task may see only its own GPU while SLURM_LOCALID is 0..7: index among the visible ones.
        index = local_rank % max(1, torch.cuda.device_count())
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), device_id=dev if device == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def run_worker(device: str, body: Callable[[DistInfo], None]) -> None:
    """A worker's life: join the group, run `body`, leave the group.

    In a process our launcher started, a UserError is handed to the launcher (a file in
    $DROPPOS_WORKER_ERRORS) and the process exits 2: the launcher prints the lowest failing rank's
    message once (a mistake seen by one rank only is not lost; one seen by all is not printed N times).
    Under torchrun (no such folder), rank 0 prints it.
    """
    if device == "cpu":
        from droppos import fastpaths

        fastpaths.keep_heap()  # every step reuses its activations' memory instead of faulting it in again
    info = init_distributed(device)
    try:
        body(info)
    except UserError as err:
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            raise
        errors = os.environ.get(WORKER_ERRORS)
        if errors:
            write_text_atomic(Path(errors, f"rank-{info.rank:06d}.txt"), str(err))  # never read half-written
        elif info.is_main:
            print(f"droppos: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        shutdown_distributed()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def all_reduce_max(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


# ---------------------------------------------------------------------------------------
# Precision, compile, seeds


def setup_precision(device: torch.device, precision: str) -> str:
    """Resolve 'auto' (bf16 on CUDA, fp32 on a CPU) and allow TF32 on CUDA (matmul and cuDNN)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS or precision == "auto":
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_seed(seed: int, rank: int, step: int) -> int:
    """A seed per (seed, rank, step): masks depend on the step alone, so resume is exact."""
    return zlib.crc32(f"{seed}/{rank}/{step}".encode()) + (seed << 32)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def wrap_ddp(model: torch.nn.Module, info: DistInfo, accum: int = 1,
             sync_buffers: bool = False) -> torch.nn.Module:
    """The model as the training step calls it: DDP-wrapped when there are several processes.

    Gradients as views of the all-reduce buckets (no copy), and a static graph (the same parameters take
    part in every step, which lets DDP plan its buckets once) where it is valid: not with gradient
    accumulation, whose no_sync micro-steps a static graph does not support (torch 2.14: "expect_autograd_
    hooks_ INTERNAL ASSERT FAILED"). Buffers are not broadcast from rank 0 before each forward (ours are
    constants) unless `sync_buffers`: a probe head's BatchNorm statistics, which every rank must share so
    that the ranks evaluate one head and the checkpoint (rank 0's) resumes them all exactly.
    """
    if not info.distributed:
        return model
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch >= 2.14 names it forward_sync_buffers (it still syncs once at init: our buffers agree then anyway).
    sync = ({"forward_sync_buffers": sync_buffers} if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else {"broadcast_buffers": sync_buffers})
    ids = [info.device.index] if info.device.type == "cuda" else None
    return ddp(model, device_ids=ids, gradient_as_bucket_view=True, static_graph=accum == 1, **sync)


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # what DDP and torch.compile put before a wrapped module's keys


def strip_prefixes(state: dict[str, Any], prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, Any]:
    """`state` with leading `prefixes` removed from its keys (each may repeat: DDP around torch.compile, ...)."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_path(out: Path) -> Path:
    """Where every training stage keeps the checkpoint it resumes from."""
    return Path(out) / "checkpoints" / "last.pt"


def check_resumable(out: Path, config: Any, stage: str, world_size: int) -> None:
    """Refuse to resume OUT's checkpoint when it belongs to another stage or architecture; refuse another
    schedule or data unless --force-resume (config.json then keeps the earlier record).

    Compared: the options declared `resume="arch"` (always refused) and `resume="run"`, the effective
    batch (batch x accum x world size) and the data manifest's sha256.
    """
    from droppos import recipes

    path = checkpoint_path(out)
    if not path.exists():
        return
    saved = load_checkpoint(path, mmap=True)
    saved_stage = saved.get("stage", stage)  # checkpoints before format 2 did not record it
    if saved_stage != stage:
        raise UserError(f"{out} holds a `droppos {saved_stage}` run; give `droppos {stage}` another --out")
    before, now = saved.get("config", {}), plain(config)
    cls = type(config)
    arch = [f"{k}={before.get(k)!r} (now {now.get(k)!r})" for k in recipes.keys(cls, "arch") if before.get(k) != now.get(k)]
    if arch:
        raise UserError(f"{out} holds a checkpoint of another model: {', '.join(arch)}; use another --out or the "
                        "same options")
    changed = [f"{k}={before.get(k)!r} (now {now.get(k)!r})" for k in recipes.keys(cls, "run")
               if k in before and before.get(k) != now.get(k)]
    accum = getattr(config, "accum", 1)
    saved_schedule = saved.get("schedule") or {}
    effective = config.batch_size * accum * world_size
    if saved_schedule.get("effective_batch") not in (None, effective):
        changed.append(f"effective batch {saved_schedule['effective_batch']} (now {effective}: {config.batch_size} x "
                       f"{accum} x {world_size} processes)")
    data_sha = file_sha256(Path(config.data) / "manifest.json") if getattr(config, "data", "") else None
    if saved.get("data_sha256") not in (None, data_sha):
        changed.append("the data (its manifest.json differs)")
    if changed and not config.force_resume:
        raise UserError(f"{out} was trained with another schedule or data: {'; '.join(changed)}. Re-run with the "
                        "same options, add --force-resume to continue with the new ones, or use another --out")


def plain(config: Any) -> dict[str, Any]:
    """A config as JSON- and weights_only-safe plain values."""
    return json.loads(json.dumps(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config))


def config_record(config: Any, resolved: dict[str, Any], schedule: Any, world_size: int) -> dict[str, Any]:
    """config.json: every option as used, with what 'auto' became (`requested` keeps what was asked),
    the world size, the schedule and the run card."""
    options = plain(config)
    record = dict(options, **resolved)
    record["requested"] = {k: options[k] for k in resolved if k in options and options[k] != resolved[k]}
    record["world_size"] = world_size
    record["schedule"] = schedule.record()
    record["run_card"] = run_card(world_size, getattr(config, "data", None))
    return record


def write_config(out: Path, record: dict[str, Any]) -> None:
    """Write OUT/config.json; an earlier record of other options moves into its `history` (never lost)."""
    from droppos.files import write_json_atomic

    path = Path(out) / "config.json"
    history: list = []
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if isinstance(previous, dict):
            history = list(previous.pop("history", []) or [])
            if _without_card(previous) != _without_card(record):
                history.append(previous)
    write_json_atomic(path, dict(record, history=history), indent=2)


def _without_card(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("run_card", "history")}


def checkpoint_state(parts: dict[str, Any], **extra: Any) -> dict:
    """A training stage's checkpoint: each part's state (modules without DDP/compile prefixes,
    optimizers as they are) by key, plus the stage's own `extra` entries."""
    state = {key: strip_prefixes(part.state_dict()) if isinstance(part, torch.nn.Module) else part.state_dict()
             for key, part in parts.items()}
    return {**state, **extra}


def resume(out: Path, device: torch.device, parts: dict[str, Any], is_main: bool) -> Optional[dict]:
    """Load OUT's last checkpoint into `parts` (the keys `checkpoint_state` saved them under).

    Returns the checkpoint, for the stage's own entries (None: nothing to resume, a fresh start).
    """
    path = checkpoint_path(out)
    if not path.exists():
        return None
    saved = load_checkpoint(path, map_location=device)
    for key, part in parts.items():
        part.load_state_dict(saved[key])
    return saved


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically (files.atomic_write): a full disk leaves the previous checkpoint and no temporary file."""
    from droppos.files import atomic_write

    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load with weights_only=True (mmap: tensors are read lazily); an unreadable file is a user-facing error."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None


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
    import platform

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
    import platform

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
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
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
