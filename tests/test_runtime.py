"""droppos.runtime's launch pieces that a CPU can check: device choice under SLURM, the cores each rank
gets, DDP's options, precision resolution, the output lock's rank, and the run card."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from droppos import UserError, runtime


def test_a_slurm_task_seeing_one_gpu_uses_it_whatever_its_local_id(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")  # world size 1: no process group is joined
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    info = runtime.init_distributed("cuda")
    assert chosen == [0] and info.device == torch.device("cuda", 0) and info.local_rank == 5
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    chosen.clear()
    assert runtime.init_distributed("cuda").device == torch.device("cuda", 5) and chosen == [5]


def test_each_rank_gets_its_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    runtime.share_cpus(8)
    assert os.environ["OMP_NUM_THREADS"] == "8" and os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "8"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting stands
    runtime.share_cpus(8)
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_ddp_without_buffer_broadcast_with_bucket_views_and_a_static_graph(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        ddp = runtime.wrap_ddp(model, runtime.DistInfo(0, 2, 0, torch.device("cpu")))  # world 2 as far as DDP cares
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        syncs = getattr(ddp, "forward_sync_buffers", None)
        assert (ddp.broadcast_buffers if syncs is None else syncs) is False
        assert ddp.gradient_as_bucket_view is True and ddp.static_graph is True
        for _ in range(2):  # a static graph still trains step after step
            ddp(torch.randn(8, 4)).sum().backward()
        accumulating = runtime.wrap_ddp(model, runtime.DistInfo(0, 2, 0, torch.device("cpu")), accum=2)
        assert accumulating.static_graph is False  # no_sync micro-steps and a static graph do not mix
        head = runtime.wrap_ddp(model, runtime.DistInfo(0, 2, 0, torch.device("cpu")), sync_buffers=True)
        assert getattr(head, "forward_sync_buffers", getattr(head, "broadcast_buffers", None)) is True  # a probe's BN
    finally:
        dist.destroy_process_group()
    assert runtime.wrap_ddp(model, runtime.DistInfo(0, 1, 0, torch.device("cpu"))) is model


def test_precision_auto_and_its_mistakes():
    assert runtime.setup_precision(torch.device("cpu"), "auto") == "fp32"
    assert runtime.setup_precision(torch.device("cpu"), "bf16") == "bf16"
    with pytest.raises(UserError, match="--precision"):
        runtime.setup_precision(torch.device("cpu"), "fp8")


def test_only_the_first_process_holds_the_output_lock(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.holds_output_lock(0) and not runtime.holds_output_lock(1)  # our own launcher, per node
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")  # started by torchrun: global rank 0 only
    assert not runtime.holds_output_lock(0)
    monkeypatch.setenv("RANK", "0")
    assert runtime.holds_output_lock(0)


def test_run_card_names_versions_hardware_and_data(sample_shards):
    card = runtime.run_card(world_size=2, data_dir=str(sample_shards))
    assert card["world_size"] == 2 and card["packages"]["torch"] == torch.__version__.split("+")[0]
    assert card["hardware"]["cpu_count"] == os.cpu_count() and card["hardware"]["gpu_count"] == torch.cuda.device_count()
    assert card["data_manifest_sha256"] == runtime.file_sha256(sample_shards / "manifest.json")
    assert len(card["data_manifest_sha256"]) == 64 and card["droppos"]
