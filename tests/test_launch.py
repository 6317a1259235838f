"""The launcher, the process group and the environment, as far as a CPU can check them: device choice under
SLURM, the cores each rank gets, DDP's options, every `auto` resolved once, the output lock's rank, the run card."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from droppos import UserError, distributed, environment, launch
from droppos.recipes import DataOptions, LaunchOptions


def test_a_slurm_task_seeing_one_gpu_uses_it_whatever_its_local_id(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that what _adopt_slurm_env sets is undone after the test:
        monkeypatch.delenv(name)      # a RANK left behind makes every later launch look started by torchrun
    monkeypatch.setenv("SLURM_PROCID", "0")  # world size 1: no process group is joined
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    launch._adopt_slurm_env()
    info = distributed.init("cuda")
    assert chosen == [0] and info.device == torch.device("cuda", 0) and info.local_rank == 5
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    chosen.clear()
    assert distributed.init("cuda").device == torch.device("cuda", 5) and chosen == [5]


def test_each_rank_gets_its_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    launch.share_cpus(8)
    assert os.environ["OMP_NUM_THREADS"] == "8" and os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "8"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting stands
    launch.share_cpus(8)
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_ddp_without_buffer_broadcast_with_bucket_views_and_a_static_graph(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        ddp = distributed.wrap_ddp(model, distributed.DistInfo(0, 2, 0, torch.device("cpu")))  # world 2 as far as DDP cares
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        syncs = getattr(ddp, "forward_sync_buffers", None)
        assert (ddp.broadcast_buffers if syncs is None else syncs) is False
        assert ddp.gradient_as_bucket_view is True and ddp.static_graph is True
        for _ in range(2):  # a static graph still trains step after step
            ddp(torch.randn(8, 4)).sum().backward()
        accumulating = distributed.wrap_ddp(model, distributed.DistInfo(0, 2, 0, torch.device("cpu")), accum=2)
        assert accumulating.static_graph is False  # no_sync micro-steps and a static graph do not mix
        head = distributed.wrap_ddp(model, distributed.DistInfo(0, 2, 0, torch.device("cpu")), sync_buffers=True)
        assert getattr(head, "forward_sync_buffers", getattr(head, "broadcast_buffers", None)) is True  # a probe's BN
    finally:
        dist.destroy_process_group()
    assert distributed.wrap_ddp(model, distributed.DistInfo(0, 1, 0, torch.device("cpu"))) is model


def test_precision_auto_and_its_mistakes():
    assert environment.resolve_precision("auto", "cpu") == "fp32"
    assert environment.resolve_precision("auto", "cuda") == "bf16"
    assert environment.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(UserError, match="--precision"):
        environment.resolve_precision("fp8", "cpu")


def test_every_auto_is_resolved_once_into_one_record(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    env = environment.resolve(LaunchOptions(device="cpu", nproc=4, nnodes=2), DataOptions(), "pretrain")
    assert env.record() == {"device": "cpu", "precision": "fp32", "compile": False, "loader": "pil", "workers": 4,
                            "processes_per_node": 4, "world_size": 8}
    env = environment.resolve(LaunchOptions(device="cpu", compile=True), DataOptions(workers=0), "finetune")
    assert (env.compile, env.workers, env.world_size) == (True, 0, 1)
    monkeypatch.setenv("RANK", "3")  # started by torchrun: its world
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    env = environment.resolve(LaunchOptions(device="cpu"), DataOptions(), "probe")
    assert (env.world_size, env.processes_per_node, env.workers) == (16, 8, 2)


def test_only_the_first_process_holds_the_output_lock(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert launch.holds_output_lock(0) and not launch.holds_output_lock(1)  # our own launcher, per node
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")  # started by torchrun: global rank 0 only
    assert not launch.holds_output_lock(0)
    monkeypatch.setenv("RANK", "0")
    assert launch.holds_output_lock(0)


def test_run_card_names_versions_hardware_and_data(sample_shards):
    card = environment.run_card(world_size=2, data_dir=str(sample_shards))
    assert card["world_size"] == 2 and card["packages"]["torch"] == torch.__version__.split("+")[0]
    assert card["hardware"]["cpu_count"] == os.cpu_count() and card["hardware"]["gpu_count"] == torch.cuda.device_count()
    assert card["data_manifest_sha256"] == environment.file_sha256(sample_shards / "manifest.json")
    assert len(card["data_manifest_sha256"]) == 64 and card["droppos"]
