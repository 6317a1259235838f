"""Starting the workers: torch's elastic launcher (torchrun's engine) or a process torchrun/SLURM started.

`--gpus N` (or `--nproc N` on a CPU) starts N workers per node through the elastic agent's c10d
rendezvous; a process that torchrun or SLURM started (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS) runs
as one worker. SIGTERM/SIGINT reach the workers, which stop together with a checkpoint; a user mistake a
worker finds is printed once, by the launcher. Only rank 0 prints, logs and writes checkpoints.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

from droppos import UserError, error_line
from droppos.environment import Environment, launched_externally, usable_cores
from droppos.files import write_text_atomic
from droppos.recipes import TrainingConfig, options, shown_name, value

WORKER_ERRORS = "DROPPOS_WORKER_ERRORS"  # the folder where launched workers leave a user mistake's message
# How long the launcher lets workers finish after it forwarded a signal (rank 0 writing a multi-GB checkpoint)
# or after a rank failed (the others, stuck in a collective with NCCL, are then killed this much later).
SHUTDOWN_TIMEOUT_S = 120


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


def run_id_for(tag: str, out: Path) -> str:
    """A rendezvous id every node derives alike from the same command."""
    return f"droppos-{tag}-" + hashlib.sha1(str(out).encode()).hexdigest()[:12]


def holds_output_lock(node_rank: int) -> bool:
    """Whether this process takes the output directory's lock: the launching process of node 0, or
    global rank 0 of a run that torchrun or SLURM started."""
    if launched_externally():
        return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
    return node_rank == 0


def start(stage: str, worker: Callable[[Any, Environment], Any], config: TrainingConfig, env: Environment, *,
          accum: int = 1, need_val: str = "") -> None:
    """What every training stage does once its own options are checked and its environment resolved: check the
    data fits a step, lock OUT, refuse a checkpoint of other options, launch `worker(config, env)` everywhere."""
    from droppos import checkpoint
    from droppos.files import claim_output, remove_stale_temporaries

    launch_options, out = config.launch, check_out_dir(config.output.out)
    if launch_options.nnodes > 1 and not launch_options.rdzv_endpoint and not launched_externally():
        raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    check_train_data(config.data.path, config.optim.batch_size * accum, env.world_size, need_val=need_val)
    # The inputs are the options declared as paths (--data, and finetune/probe's --encoder, --run, --weights).
    inputs = [(shown_name(o), value(config, o)) for o in options(type(config)) if o.spec.path and o.name != "out"]
    holds = holds_output_lock(launch_options.node_rank)
    with claim_output(out, stage, inputs, lock=holds):
        if holds:  # claim_output cleaned OUT; only the lock holder may remove what a killed run left in checkpoints/
            remove_stale_temporaries(out / "checkpoints")
        checkpoint.check_resumable(out, config, stage, accum, env.world_size)
        launch(worker, (config, env), nproc_per_node=env.processes_per_node, nnodes=launch_options.nnodes,
               node_rank=launch_options.node_rank, rdzv_endpoint=launch_options.rdzv_endpoint,
               run_id=run_id_for(stage, out))


def launch(
    entry: Callable[..., Any],
    args: tuple,
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str = "",
    run_id: str = "",
) -> None:
    """Run `entry(*args)` in every worker: here, or in N processes via elastic launch.

    `entry` must be a module-level function (workers import it by name).
    """
    if launched_externally() or (nproc_per_node <= 1 and nnodes <= 1):
        entry(*args)
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
        elastic_launch(config, _elastic_entry)(entry.__module__, entry.__qualname__, *args)
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
    share = str(max(1, usable_cores() // max(1, processes)))
    os.environ.setdefault("OMP_NUM_THREADS", share)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", share)


def _elastic_entry(module: str, name: str, *args: Any) -> None:
    """What each launched worker runs: import the stage's entry by name and call it."""
    getattr(importlib.import_module(module), name)(*args)


def run_worker(env: Environment, body: Callable[[Any], None]) -> None:
    """A worker's life: join the group, run `body`, leave the group.

    In a process our launcher started, a UserError is handed to the launcher (a file in
    $DROPPOS_WORKER_ERRORS) and the process exits 2: the launcher prints the lowest failing rank's
    message once (a mistake seen by one rank only is not lost; one seen by all is not printed N times).
    Under torchrun (no such folder), rank 0 prints it.
    """
    from droppos import distributed, environment

    if env.device == "cpu":
        from droppos import fastpaths

        fastpaths.keep_heap()  # every step reuses its activations' memory instead of faulting it in again
    _adopt_slurm_env()
    info = distributed.init(env.device)
    environment.prepare(info.device)
    try:
        body(info)
    except UserError as err:
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            raise
        errors = os.environ.get(WORKER_ERRORS)
        if errors:
            write_text_atomic(Path(errors, f"rank-{info.rank:06d}.txt"), str(err))  # never read half-written
        elif info.is_main:
            print(error_line(err), file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        distributed.shutdown()
