"""A worker's place among the ranks and what it does with the others: the process group, reductions, DDP.

`launch` starts the workers; each joins the group here (`init`), and the stages and the loop
communicate through a `DistInfo` (one rank's view) and the helpers below.
"""

from __future__ import annotations

import datetime
import inspect
import os
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# What DDP and torch.compile put before a wrapped module's parameter names.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class DistInfo:
    """The group a worker communicates in: its rank, the group's size, its device."""

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

    def alone(self) -> "DistInfo":
        """This process as a group of its own (work that rank 0 does alone, e.g. a probe head on cached features)."""
        return DistInfo(rank=0, world_size=1, local_rank=self.local_rank, device=self.device)


def init(device_type: str) -> DistInfo:
    """Join the process group (NCCL on CUDA, gloo on CPU) when there is more than one worker."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        # A SLURM task may see only its own GPU while SLURM_LOCALID is 0..7: index among the visible ones.
        index = local_rank % max(1, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device_type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> None:
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


def step_seed(seed: int, rank: int, step: int) -> int:
    """A seed per (seed, rank, step): a step's random draws depend on the step alone, so resume is exact."""
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


def wrap_ddp(model: torch.nn.Module, info: DistInfo, accum: int = 1, sync_buffers: bool = False) -> torch.nn.Module:
    """The model as the training step calls it: DDP-wrapped when there are several processes.

    Gradients are views of the all-reduce buckets (no copy); the graph is static (buckets planned once) except
    with gradient accumulation, whose no_sync micro-steps a static graph does not support. Buffers are not
    broadcast before each forward (ours are constants) unless `sync_buffers`: a probe head's BatchNorm
    statistics, which every rank must share.
    """
    if not info.distributed:
        return model
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch >= 2.14 names it forward_sync_buffers (it still syncs once at init: our buffers agree then anyway).
    sync = ({"forward_sync_buffers": sync_buffers} if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else {"broadcast_buffers": sync_buffers})
    ids = [info.device.index] if info.device.type == "cuda" else None
    return ddp(model, device_ids=ids, gradient_as_bucket_view=True, static_graph=accum == 1, **sync)
