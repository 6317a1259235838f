"""`droppos pretrain`: outputs, gloo DDP with accumulation, the paper recipe's clipping and weight decay,
presets and user mistakes (resume, signals and divergence: tests/test_loop.py, for every stage). Runs the
real CLI in subprocesses on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from inprocess import droppos, process

from droppos.pretrain import sigma_at_step
from droppos.recipes import PretrainConfig, make_config, option_values

TINY = [
    "--model", "vit_tiny_patch16", "--img-size", "32", "--patch-size", "8", "--depth", "1",
    "--decoder-width", "64", "--decoder-depth", "1", "--batch-size", "8", "--epochs", "4",
    "--warmup-epochs", "1", "--device", "cpu", "--no-compile", "--loader", "pil", "--workers", "0",
]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- recipes and schedules ---------------------------------------------------------------


def test_defaults_and_presets_are_the_papers_recipe():
    c = option_values(PretrainConfig())  # by flat option name, whichever section holds it
    assert (c["model"], c["img_size"], c["epochs"], c["warmup_epochs"], c["batch_size"]) == ("vit_base_patch16", 224, 800, 10, 64)
    assert (c["blr"], c["weight_decay"], c["clip_grad"]) == (1.5e-4, 0.05, 5.0)
    assert (c["mask_ratio"], c["pos_mask_ratio"], c["sigma"], c["sigma_decay"], c["tau"]) == (0.75, 0.75, 1.0, True, 0.1)
    assert (c["attentive"], c["mask_token"], c["decoder_width"], c["decoder_depth"]) == (True, "learnable", 512, 2)
    b800 = make_config(PretrainConfig, {"preset": "vit_b16_800ep"})
    b200 = make_config(PretrainConfig, {"preset": "vit_b16_200ep"})
    l800 = make_config(PretrainConfig, {"preset": "vit_l16_800ep"})
    assert (b800.model.arch, b800.optim.epochs, b800.optim.warmup_epochs, b800.optim.batch_size, b800.optim.blr) == (
        "vit_base_patch16", 800, 10, 64, 1.5e-4)
    assert (b200.model.arch, b200.optim.epochs, b200.optim.warmup_epochs, b200.optim.batch_size) == (
        "vit_base_patch16", 200, 10, 64)
    assert (l800.model.arch, l800.optim.epochs, l800.optim.warmup_epochs, l800.optim.batch_size, l800.optim.blr) == (
        "vit_large_patch16", 800, 40, 128, 1.5e-4)
    for preset in (b800, b200, l800):
        p = preset.pretext
        assert (p.mask_ratio, p.pos_mask_ratio, p.sigma, p.attentive) == (0.75, 0.75, 1.0, True)
    # The command line overrides the preset.
    assert make_config(PretrainConfig, {"preset": "vit_b16_800ep", "epochs": 3}).optim.epochs == 3


def test_paper_recipe_clips_per_parameter_and_decays_the_tokens():
    """The published code: each gradient tensor to norm 5 (clip / (norm + 1e-6)), weight decay on every
    parameter but 1-D ones and biases, so on [CLS] and [MASK] too. cpu-demo keeps the global clip."""
    from droppos.model import create_from_config
    from droppos.pretrain import clip_gradients, optimizer_groups

    defaults = PretrainConfig().optim
    assert (defaults.clip_mode, defaults.decay_tokens) == ("per-param", True)
    demo = make_config(PretrainConfig, {"preset": "cpu-demo"}).optim
    assert (demo.clip_mode, demo.decay_tokens) == ("global", False)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 3)) for _ in range(4)]
    for i, p in enumerate(params):
        p.grad = torch.randn(7, 3) * (0.3 + 3 * i)
    expected = []
    for p in params:  # the reference: one tensor at a time, in plain Python
        norm = float(p.grad.pow(2).sum().sqrt())
        expected.append(p.grad * min(1.0, 5.0 / (norm + 1e-6)))
    total = float(torch.cat([p.grad.flatten() for p in params]).norm())
    assert float(clip_gradients(params, 5.0, "per-param")) == pytest.approx(total, rel=1e-6)
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want)
    # 'global': all gradients scaled together to norm 5 (and 0: none clipped, the norm still measured).
    for p in params:
        p.grad = torch.ones(7, 3)
    norm = float(torch.cat([p.grad.flatten() for p in params]).norm())
    assert float(clip_gradients(params, 5.0, "global")) == pytest.approx(norm, rel=1e-6)
    assert float(torch.cat([p.grad.flatten() for p in params]).norm()) == pytest.approx(5.0, rel=1e-5)
    assert float(clip_gradients(params, 0.0, "global")) == pytest.approx(5.0, rel=1e-5)
    params[0].grad[0, 0] = float("nan")
    assert not torch.isfinite(clip_gradients(params, 5.0, "global"))  # the non-finite check sees it
    model = create_from_config(make_config(PretrainConfig, {"preset": "cpu-demo", "depth": 1}))
    for decay_tokens, token_decay in ((True, 0.05), (False, 0.0)):
        groups = optimizer_groups(model, 0.05, decay_tokens)
        decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        for name, p in model.named_parameters():
            if name in ("cls_token", "mask_pos_token"):
                assert decay[id(p)] == token_decay, name
            elif p.ndim <= 1 or name.endswith(".bias"):
                assert decay[id(p)] == 0.0, name
            else:
                assert decay[id(p)] == 0.05, name


def test_sigma_linear():
    assert sigma_at_step(0, 100, 1.0, True) == 1.0
    assert sigma_at_step(50, 100, 1.0, True) == pytest.approx(0.5)
    assert sigma_at_step(100, 100, 1.0, True) == 0.0
    assert sigma_at_step(70, 100, 1.0, False) == 1.0


# --- runs --------------------------------------------------------------------------------


def test_short_run_writes_every_output(sample_shards, tmp_path):
    run = tmp_path / "run"
    result = droppos("pretrain", "--data", str(sample_shards), "--out", str(run), *TINY, "--max-steps", "6", "--log-every", "2")
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["model"] == "vit_tiny_patch16" and config["optim"]["max_steps"] == 6
    records = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    for key in ("epoch", "loss", "pos_acc", "lr", "sigma", "img_per_s", "data_wait"):
        assert all(math.isfinite(r[key]) for r in records), key
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 6
    assert (run / "encoder.safetensors").exists()
    encoder_meta = json.loads((run / "encoder.json").read_text())
    assert encoder_meta["model"].startswith("vit_tiny_patch16")
    assert "held-out pos_acc" in result.stderr
    # --export-only rewrites the encoder from the checkpoint.
    (run / "encoder.safetensors").unlink()
    result = droppos("pretrain", "--export-only", "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert (run / "encoder.safetensors").exists()


def test_two_gloo_processes_finish_together(sample_shards, tmp_path):
    run = tmp_path / "run"
    # Accumulation too: DDP's no_sync micro-steps with a static graph.
    result = process("pretrain", "--data", str(sample_shards), "--out", str(run), *TINY, "--nproc", "2",
                     "--batch-size", "4", "--accum", "2", "--max-steps", "4", "--log-every", "2", timeout=400)
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "config.json").read_text())["environment"]["world_size"] == 2
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert [r["step"] for r in metrics(run) if "loss" in r] == [2, 4]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/shards", "--out", "{tmp}/r"], "does not exist"),
        (["--data", "{shards}", "--out", "{tmp}/r", "--gpus", "8"], "--gpus"),
        (["--data", "{shards}", "--out", "{tmp}/r", "--model", "vit_enormous"], "--model 'vit_enormous'"),
        (["--data", "{shards}", "--out", "{tmp}/r", "--preset", "nope"], "unknown preset"),
        (["--data", "{shards}"], "--out is required"),
        (["--data", "{shards}", "--out", "{tmp}/r", "--mask-ratio", "1.5"], "--mask-ratio"),
        (["--data", "{shards}", "--out", "{tmp}/r", "--img-size", "30", "--patch-size", "8"], "divisible"),
        (["--data", "{shards}", "--out", "{tmp}/r", "--clip-mode", "sideways"], "--clip-mode"),
        (["--data", "{shards}", "--out", "{tmp}/r", "--tau", "0"], "--tau 0 is out of range"),
    ],
)
def test_user_mistakes_are_one_line(sample_shards, tmp_path, args, message):
    if "--gpus" in args and torch.cuda.is_available() and torch.cuda.device_count() >= 8:
        pytest.skip("8 GPUs are visible: --gpus 8 is no mistake here")
    args = [a.format(tmp=tmp_path, shards=sample_shards) for a in args]
    result = droppos("pretrain", *args, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_checkpoint_of_another_model_is_refused(sample_shards, tmp_path):
    run = tmp_path / "run"
    assert droppos("pretrain", "--data", str(sample_shards), "--out", str(run), *TINY, "--max-steps", "1").returncode == 0
    result = droppos("pretrain", "--data", str(sample_shards), "--out", str(run), *TINY, "--depth", "2", "--max-steps", "2")
    assert result.returncode == 2
    assert "another model" in result.stderr and "depth=1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cpu_demo_preset_learns_positions(demo_run):
    """The cpu-demo preset lifts held-out position accuracy (val split, percent) to >= 5x chance."""
    config = json.loads((demo_run / "config.json").read_text())
    patch = config["model"]["patch_size"]
    num_positions = (config["model"]["img_size"] // patch) ** 2
    held_out = [r["val_pos_acc"] for r in metrics(demo_run) if "val_pos_acc" in r]
    assert held_out, "no held-out evaluation was logged"
    assert held_out[-1] >= 5 * 100.0 / num_positions, (held_out, num_positions)  # percent
    assert held_out[-1] > held_out[0]  # it learned during the run
    assert (demo_run / "encoder.safetensors").exists()
