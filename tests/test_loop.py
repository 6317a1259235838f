"""The shared training loop, the same way for pretrain, finetune and probe (the real CLI, tiny models):
kill -9 then resume reproduces the uninterrupted run's losses; SIGTERM saves and exits 143; a non-finite
loss stops with one line and keeps a finite checkpoint; metrics.jsonl has each step once; an interrupted
evaluation runs again; one writer per run directory; resuming with another schedule needs --force-resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from inprocess import droppos, process

from droppos.distributed import DistInfo
from droppos.environment import Environment
from droppos.loop import Metric, MetricWindow, Schedule, Stage, evaluation_due, lr_at, train
from droppos.recipes import LoggingOptions, OutputOptions, TrainingConfig, option_values

CPU = ["--device", "cpu", "--no-compile", "--loader", "pil", "--workers", "0"]
STAGES = {
    # 120 train images: 15 steps per epoch at batch 8 (pretrain, probe), 7 at batch 16 (finetune).
    "pretrain": ["--model", "vit_tiny_patch16", "--img-size", "32", "--patch-size", "8", "--depth", "1",
                 "--decoder-width", "64", "--decoder-depth", "1", "--batch-size", "8", "--epochs", "4",
                 "--warmup-epochs", "1"],
    # Mixup, cutmix, erasing, drop path and EMA on: every random stream must come back on resume.
    "finetune": ["--timm-model", "vit_tiny_patch16_224", "--img-size", "32", "--depth", "2", "--batch-size", "16",
                 "--epochs", "8", "--warmup-epochs", "1", "--ema", "--drop-path", "0.1"],
    # The streaming probe: the frozen encoder on augmented images every step.
    "probe": ["--timm-model", "vit_tiny_patch16_224", "--img-size", "32", "--depth", "1", "--batch-size", "8",
              "--epochs", "4", "--warmup-epochs", "1"],
}
STEPS = {"pretrain": 60, "finetune": 56, "probe": 60}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "droppos", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        path = run / "metrics.jsonl"
        if path.exists():
            try:
                if any(r.get("step", 0) >= step and "loss" in r for r in metrics(run)):
                    return
            except ValueError:
                pass  # a line being written
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training progress")


def command(stage: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [stage, "--data", str(data), "--out", str(out), *STAGES[stage], *CPU, *extra]


# --- the schedule --------------------------------------------------------------------------


def test_lr_warmup_then_cosine():
    assert lr_at(0, 1.0, 10, 100) == 0.0
    assert lr_at(5, 1.0, 10, 100) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 10, 100, min_lr=0.1) == pytest.approx(0.1)


def test_evaluations_fall_on_epoch_ends_and_the_stop_step():
    schedule = Schedule(steps_per_epoch=10, epochs=5, warmup_steps=0, peak_lr=1.0, min_lr=0.0, images_per_step=8,
                        max_steps=45)
    assert schedule.stop_step == 45 and schedule.position(23) == (2, 3)
    assert [s for s in range(46) if evaluation_due(s, schedule, 1)] == [10, 20, 30, 40, 45]
    assert [s for s in range(46) if evaluation_due(s, schedule, 2)] == [20, 40, 45]
    assert [s for s in range(46) if evaluation_due(s, schedule, 0)] == [45]


# --- exact resume, signals, divergence: the same for every stage ------------------------------


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill9_then_resume_matches_an_uninterrupted_run(stage, sample_shards, tmp_path):
    steps = STEPS[stage]
    extra = ["--max-steps", str(steps), "--log-every", "1", "--ckpt-every", "3"]
    straight = tmp_path / "straight"
    result = droppos(*command(stage, sample_shards, straight, *extra))
    assert result.returncode == 0, result.stderr
    resumed = tmp_path / "resumed"
    proc = start(*command(stage, sample_shards, resumed, *extra))
    wait_for_step(resumed, 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 3 <= killed_at < steps
    result = droppos(*command(stage, sample_shards, resumed, *extra))
    assert result.returncode == 0, result.stderr
    assert f"resumed from step {killed_at}" in result.stderr
    want = {r["step"]: r for r in metrics(straight) if "loss" in r}
    records = [r for r in metrics(resumed) if "loss" in r]
    got = {r["step"]: r for r in records}
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # each step once: no duplicates after resume
    for step in range(1, steps + 1):
        assert got[step]["lr"] == want[step]["lr"], step
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5, abs=1e-6), (step, killed_at)
    evaluations = [r for r in metrics(resumed) if any(k.startswith("val_") for k in r)]
    assert [r["step"] for r in evaluations] == [r["step"] for r in metrics(straight) if any(k.startswith("val_") for k in r)]


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigterm_saves_a_checkpoint_and_exits_143(stage, sample_shards, tmp_path):
    run = tmp_path / "run"
    proc = start(*command(stage, sample_shards, run, "--log-every", "1", "--ckpt-every", "1000"))
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "re-run the same command to resume" in err and "Traceback" not in err
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] >= 2 and saved["reason"] == "stopped by SIGTERM" and saved["stage"] == stage


@pytest.mark.parametrize("stage", list(STAGES))
def test_divergence_stops_with_one_line_and_keeps_a_finite_checkpoint(stage, sample_shards, tmp_path):
    run = tmp_path / "run"
    result = droppos(*command(stage, sample_shards, run, "--lr", "1e30", "--warmup-epochs", "0", "--log-every", "1",
                              "--ckpt-every", "1", "--max-steps", "20"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "non-finite" in lines[-1] and lines[-1].startswith("droppos: error:") and "Traceback" not in result.stderr
    last = run / "checkpoints" / "last.pt"
    if last.exists():
        saved = torch.load(last, weights_only=True)
        for part in ("model", "head", "ema"):
            for value in (saved.get(part) or {}).values():
                if value.is_floating_point():
                    assert torch.isfinite(value).all(), part


# --- evaluation, metrics, locks, resume compatibility (pretrain stands for all: the loop is shared) ---


class Toy(Stage):
    """A linear model on seeded random batches: the loop's bookkeeping without a real stage."""

    name = "toy"
    metrics = (Metric("loss"),)
    schedule = Schedule(steps_per_epoch=5, epochs=3, warmup_steps=0, peak_lr=0.1, min_lr=0.0, images_per_step=8)

    def __init__(self, sigterm_at: int = -1) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0)
        self.sigterm_at, self.evaluated = sigterm_at, []

    def parts(self):
        return {"model": self.model, "optimizer": self.optimizer}

    def batches(self, epoch, start_batch):
        for batch in range(start_batch, 5):
            yield torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * epoch + batch))

    def step(self, step, micro, window):
        loss = self.model(micro[0]).square().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        window.add("loss", loss.detach())
        if step + 1 == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives before the loop's stop check of this step

    def evaluate(self, step, epoch, progress):
        self.evaluated.append(step)
        return {"val_loss": 0.0}


def _toy_run(out: Path, stage: Stage) -> None:
    config = TrainingConfig(output=OutputOptions(out=str(out), ckpt_every=100), logging=LoggingOptions(log_every=1))
    env = Environment(device="cpu", precision="fp32", compile=False, loader="pil", workers=0, processes_per_node=1,
                      world_size=1)
    train(stage, config, env, DistInfo(0, 1, 0, torch.device("cpu")))


def test_metrics_are_added_by_name_and_the_non_finite_count_is_apart():
    window = MetricWindow((Metric("loss"), Metric("acc", percent=True)), torch.device("cpu"))
    window.add("acc", torch.tensor(0.5))
    window.add("loss", torch.tensor(2.0))
    window.check_finite(torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf")))
    assert window.sums.tolist() == [2.0, 0.5, 2.0] and float(window.nonfinite) == 2.0
    with pytest.raises(KeyError):
        window.add("top5", torch.tensor(1.0))  # a metric the stage did not declare
    window.reset()
    assert window.sums.tolist() == [0.0, 0.0, 0.0]


def test_an_interrupted_evaluation_runs_again_on_resume(tmp_path):
    out = tmp_path / "toy"
    first = Toy(sigterm_at=10)  # the last step of epoch 2: stopped before its evaluation
    with pytest.raises(SystemExit) as stopped:
        _toy_run(out, first)
    assert stopped.value.code == 143 and first.evaluated == [5]
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["step"], saved["evaluated_step"], saved["stage"]) == (10, 5, "toy")
    second = Toy()
    _toy_run(out, second)
    assert second.evaluated == [10, 15]  # the interrupted evaluation first, then the rest
    records = metrics(out)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 16))
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10, 15]
    third = Toy()
    _toy_run(out, third)  # finished: nothing to train, nothing evaluated again
    assert third.evaluated == []


def test_one_writer_per_run_directory(sample_shards, tmp_path):
    run = tmp_path / "run"
    proc = start(*command("pretrain", sample_shards, run, "--log-every", "1"))
    try:
        wait_for_step(run, 1, proc)
        result = droppos(*command("pretrain", sample_shards, run), timeout=120)
        assert result.returncode == 2
        line, = result.stderr.strip().splitlines()
        assert "is in use by `droppos pretrain`" in line and f"pid {proc.pid}" in line and "since" in line
    finally:
        proc.kill()
        proc.wait()
    # The killed holder's lock is taken over by the next run.
    result = droppos(*command("pretrain", sample_shards, run, "--max-steps", "2"))
    assert result.returncode == 0, result.stderr
    assert "taking over the lock" in result.stderr


def test_another_schedule_needs_force_resume_and_config_keeps_both(sample_shards, tmp_path):
    run = tmp_path / "run"
    assert droppos(*command("pretrain", sample_shards, run, "--max-steps", "2")).returncode == 0
    result = droppos(*command("pretrain", sample_shards, run, "--max-steps", "4", "--batch-size", "4"))
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert "batch_size=8 (now 4)" in line and "--force-resume" in line
    result = droppos(*command("pretrain", sample_shards, run, "--max-steps", "4", "--batch-size", "4", "--force-resume"))
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["optim"]["batch_size"] == 4 and [h["optim"]["batch_size"] for h in config["history"]] == [8]
    assert config["output"]["force_resume"] is True and config["history"][0]["output"]["force_resume"] is False
    assert config["run_card"]["data_manifest_sha256"] and config["run_card"]["packages"]["torch"]


def test_checkpoints_of_earlier_formats_resume_and_a_newer_one_is_refused(sample_shards, tmp_path):
    """Format 2 (a flat config by option name) and format 1 (no tag, no stage) resume exactly: the steps after
    them equal an uninterrupted run's. A format this version does not know is one line, exit 2."""
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert droppos(*command("pretrain", sample_shards, straight, "--max-steps", "6", "--log-every", "1")).returncode == 0
    path = run / "checkpoints" / "last.pt"
    for max_steps, downgrade in ((2, None), (4, "droppos-checkpoint/2"), (6, None)):
        if downgrade is not None or max_steps == 6:
            saved = torch.load(path, weights_only=True)
            old = dict(saved, config=option_values(saved["config"]))
            old.pop("environment")
            if max_steps == 6:  # format 1: neither tag nor stage
                old.pop("format"), old.pop("stage")
            else:
                old["format"] = downgrade
            torch.save(old, path)
        result = droppos(*command("pretrain", sample_shards, run, "--max-steps", str(max_steps), "--log-every", "1"))
        assert result.returncode == 0, result.stderr
    assert [r["loss"] for r in metrics(run) if "loss" in r] == [r["loss"] for r in metrics(straight) if "loss" in r]
    saved = torch.load(path, weights_only=True)
    assert saved["format"] == "droppos-checkpoint/3" and saved["config"]["model"]["model"] == "vit_tiny_patch16"
    torch.save(dict(saved, format="droppos-checkpoint/9"), path)
    result = droppos(*command("pretrain", sample_shards, run, "--max-steps", "8"))
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert "newer droppos (droppos-checkpoint/9" in line and str(path) in line


def test_a_damaged_checkpoint_is_named_and_the_one_before_it_resumes(sample_shards, tmp_path):
    """One flipped bit in last.pt (torch.load would load it: it does not check the zip's CRC) stops the resume with
    one line naming the file and the command that puts previous.pt back; after it, the run resumes exactly."""
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert droppos(*command("pretrain", sample_shards, straight, "--max-steps", "6", "--log-every", "1")).returncode == 0
    for steps in ("2", "4"):
        assert droppos(*command("pretrain", sample_shards, run, "--max-steps", steps, "--log-every", "1")).returncode == 0
    last, previous = run / "checkpoints" / "last.pt", run / "checkpoints" / "previous.pt"
    assert torch.load(previous, weights_only=True)["step"] == 2
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x10
    last.write_bytes(bytes(data))
    for reader in (["pretrain", *command("pretrain", sample_shards, run, "--max-steps", "6")[1:]],
                   ["export", str(last), "--out", str(tmp_path / "exported")]):
        result = droppos(*reader)
        assert result.returncode == 2, result.stderr
        line, = result.stderr.strip().splitlines()
        assert f"checkpoint {last}" in line and "damaged" in line and f"`mv {previous} {last}`" in line, line
    previous.replace(last)
    result = droppos(*command("pretrain", sample_shards, run, "--max-steps", "6", "--log-every", "1"))
    assert result.returncode == 0, result.stderr
    assert [r["loss"] for r in metrics(run) if "loss" in r] == [r["loss"] for r in metrics(straight) if "loss" in r]


def test_config_records_what_auto_became(sample_shards, tmp_path):
    run = tmp_path / "run"
    result = droppos("pretrain", "--data", str(sample_shards), "--out", str(run), *STAGES["pretrain"],
                     "--max-steps", "1", "--workers", "0", "--no-compile")
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["environment"] == {"device": "cpu", "precision": "fp32", "compile": False, "loader": "pil",
                                     "workers": 0, "processes_per_node": 1, "world_size": 1}
    assert config["data"]["loader"] == "auto" and config["launch"]["precision"] == "auto"  # what was asked
    assert config["schedule"]["effective_batch"] == 8 and math.isclose(config["schedule"]["peak_lr"], 1.5e-4 * 8 / 256)
    card = config["run_card"]
    assert card["world_size"] == 1 and card["hardware"]["cpu_count"] >= 1 and "timm" in card["packages"]


# --- the GPU path's numerics on a CPU --------------------------------------------------------


@pytest.mark.parametrize("stage", list(STAGES))
def test_bf16_autocast_runs_every_stage(stage, sample_shards, tmp_path):
    """CPU bf16 autocast through each stage's step and evaluation, so that dtype mismatches of the CUDA
    path surface here. pretrain also runs compiled under DDP (2 gloo processes): all three together."""
    run = tmp_path / "run"
    extra = ["--precision", "bf16", "--max-steps", "2", "--log-every", "1"]
    if stage == "pretrain":
        extra += ["--nproc", "2", "--compile"]
    run_it = process if stage == "pretrain" else droppos  # two ranks need processes of their own
    result = run_it(*command(stage, sample_shards, run, *extra), timeout=900)
    assert result.returncode == 0, result.stderr
    records = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    config = json.loads((run / "config.json").read_text())
    assert config["environment"]["precision"] == "bf16" and config["environment"]["compile"] is (stage == "pretrain")


# --- several ranks: the launcher's own exits ----------------------------------------------------


def test_skipped_corrupt_samples_are_counted_across_ranks_and_listed(corrupt_jpeg, tmp_path):
    """A sample the Pillow loader cannot decode, on whichever of two ranks reads it: metrics.jsonl counts it for
    both ranks together (once per epoch it is met in) and the ranks' skipped files list it with how often;
    a resumed session adds to the file's counts."""
    data, _ = corrupt_jpeg(split="train", shard=1, sample=1)
    run = tmp_path / "run"
    result = process(*command("pretrain", data, run, "--nproc", "2", "--log-every", "5", "--max-steps", "15"))
    assert result.returncode == 0, result.stderr

    def skipped() -> tuple[int, list[dict]]:
        logged = [r for r in metrics(run) if "loss" in r][-1].get("skipped_samples", 0)
        return logged, [json.loads(line) for path in sorted(run.glob("skipped.rank*.jsonl"))
                        for line in path.read_text().splitlines()]

    logged, listed = skipped()  # 2 epochs and a step: met once or twice, by whichever rank reads it
    assert logged >= 1 and len(listed) == 1 and listed[0]["split"] == "train" and listed[0]["times"] == logged
    result = process(*command("pretrain", data, run, "--nproc", "2", "--log-every", "5", "--max-steps", "28"))
    assert result.returncode == 0, result.stderr
    again, now = skipped()  # the epochs' shard orders differ: the other rank may have met it too (its own file)
    assert again >= 1 and {e["key"] for e in now} == {listed[0]["key"]} and sum(e["times"] for e in now) == logged + again



def test_with_two_ranks_a_workers_mistake_is_one_line_and_a_signal_stops_both(sample_shards, tmp_path):
    """A mistake the workers find (divergence) is printed once, exit 2, not once per rank plus the launcher's
    'a worker failed'. SIGTERM to the launcher reaches both workers, which save at an agreed step; exit 143."""
    two = ["--nproc", "2", "--log-every", "1"]
    result = process(*command("pretrain", sample_shards, tmp_path / "diverged", *two, "--lr", "1e30",
                              "--warmup-epochs", "0", "--max-steps", "6"))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("droppos: error:")]
    assert len(errors) == 1 and "non-finite" in errors[0] and "worker process failed" not in result.stderr
    run = tmp_path / "stopped"
    proc = start(*command("pretrain", sample_shards, run, *two, "--ckpt-every", "1000"))
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "worker process failed" not in err
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["reason"] == "stopped by SIGTERM" and saved["world_size"] == 2
