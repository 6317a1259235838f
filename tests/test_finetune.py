"""`droppos finetune` and droppos/encoders.py: loading encoders, layer-wise lr decay, learning,
evaluation across 2 gloo ranks, resume after SIGTERM, results.json and user mistakes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from inprocess import droppos, process

from droppos import UserError, checkpoint
from droppos.distributed import DistInfo
from droppos.environment import Environment
from droppos.encoders import evaluate_topk, load_encoder
from droppos.recipes import FinetuneConfig, make_config, to_record

TINY = [
    "--timm-model", "vit_tiny_patch16_224", "--img-size", "32", "--depth", "2", "--batch-size", "16",
    "--device", "cpu", "--no-compile", "--loader", "pil", "--workers", "0", "--log-every", "2",
]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def val_count(data: Path) -> int:
    return json.loads((data / "manifest.json").read_text())["splits"]["val"]["num_samples"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny DropPos encoder (32 px, 8 px patches, 2 blocks) exported as a pretrain run would."""
    from droppos.export import export_encoder

    torch.manual_seed(0)
    model = timm.create_model("droppos_vit_tiny_patch16", img_size=32, patch_size=8, depth=2).eval()
    run = tmp_path_factory.mktemp("pretrain-run")
    export_encoder(model, run / "encoder.safetensors")
    return run, model


# --- encoders ----------------------------------------------------------------------------


def test_encoder_loads_the_pretrained_weights(exported):
    run, droppos_model = exported
    images = torch.randn(2, 3, 32, 32)
    vit, info = load_encoder(run=run, num_classes=0, global_pool="token")
    assert info["pretrained"] and info["img_size"] == (32, 32) and info["num_features"] == 192
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(images), droppos_model.forward_features(images),
                                   rtol=0, atol=1e-5)
        # [CLS] pooling without head: the features are the final-norm [CLS] token.
        torch.testing.assert_close(vit(images), droppos_model.forward_features(images)[:, 0], rtol=0, atol=1e-5)
    # Same file through --encoder, with avg pooling: fresh fc_norm and head, blocks loaded.
    clf, info = load_encoder(encoder=run / "encoder.safetensors", num_classes=7, global_pool="avg", drop_path_rate=0.1)
    assert info["source"] == "encoder" and clf.head.out_features == 7 and isinstance(clf.norm, torch.nn.Identity)
    torch.testing.assert_close(clf.blocks[1].mlp.fc2.weight, droppos_model.blocks[1].mlp.fc2.weight)
    # Another resolution resamples the position embedding (5x5 grid + [CLS]).
    big, info = load_encoder(run=run, img_size=40)
    assert big.pos_embed.shape == (1, 26, 192) and info["img_size"] == (40, 40)
    # The baseline of the same size: same architecture, not the weights.
    rand, info = load_encoder(run=run, random_init=True)
    assert not info["pretrained"] and rand.pos_embed.shape == droppos_model.pos_embed.shape
    assert not torch.equal(rand.blocks[0].attn.qkv.weight, droppos_model.blocks[0].attn.qkv.weight)


def test_encoder_user_mistakes(exported, tmp_path):
    run, _ = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "encoder.safetensors").write_bytes(b"not safetensors")
    (bad / "encoder.json").write_text((run / "encoder.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    from safetensors.torch import save_file

    save_file({"cls_token": torch.zeros(1, 1, 64)}, str(other / "encoder.safetensors"))
    (other / "encoder.json").write_text((run / "encoder.json").read_text())
    cases = [
        (dict(), "exactly one"),
        (dict(run=run, timm_model="vit_tiny_patch16_224"), "exactly one"),
        (dict(run=tmp_path / "missing"), "no such run"),
        (dict(encoder=tmp_path / "missing.safetensors"), "no such file"),
        (dict(run=tmp_path), "no encoder.safetensors"),
        (dict(run=bad), "cannot read"),
        (dict(run=other), "does not match"),
        (dict(timm_model="vit_no_such_model"), "unknown timm model"),
        (dict(timm_model="droppos_vit_tiny_patch16"), "pre-training model"),
        (dict(timm_model="resnet18"), "not a Vision Transformer"),
        (dict(run=run, img_size=36), "not divisible"),
        (dict(run=run, depth=3), "--depth only applies"),
        (dict(run=run, global_pool="max"), "--pool"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            load_encoder(**kwargs)


def test_evaluate_topk_ignores_padding():
    logits = torch.tensor([[5.0, 1, 0], [0, 5, 1], [0, 1, 5], [5, 0, 0]])
    labels = torch.tensor([0, 2, 1, -1])  # hit, top-2 only, top-2 only, padding
    scores = evaluate_topk(lambda x: x, [(logits, labels)], torch.device("cpu"))
    assert scores["num_eval_samples"] == 3
    assert scores["top1"] == pytest.approx(100 / 3) and scores["top5"] == pytest.approx(100.0)


# --- recipe, layer decay, learning ------------------------------------------------------------


def test_defaults_are_the_mae_fine_tuning_recipe():
    c = FinetuneConfig()
    o, a = c.optim, c.augment
    assert (o.epochs, o.warmup_epochs, o.blr, o.layer_decay, o.weight_decay, a.drop_path) == (100, 5, 1e-3, 0.75, 0.05, 0.1)
    assert (a.mixup, a.cutmix, a.smoothing, a.reprob, c.encoder.pool) == (0.8, 1.0, 0.1, 0.25, "avg")
    large = make_config(FinetuneConfig, {"preset": "vit_l16"})
    assert (large.optim.epochs, large.augment.drop_path) == (50, 0.1)  # the published DropPos ViT-L script (MAE's: 0.2)
    assert make_config(FinetuneConfig, {"preset": "cpu-demo", "epochs": 2}).optim.epochs == 2


def test_layer_decay_lr_scale_per_block():
    from timm.scheduler import CosineLRScheduler

    from droppos.finetune import optimizer_groups

    depth, decay = 3, 0.75
    model, _ = load_encoder(timm_model="vit_tiny_patch16_224", img_size=32, depth=depth, num_classes=10)
    groups = optimizer_groups(model, 0.05, decay)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        if name.startswith("blocks."):
            expected = decay ** (depth - int(name.split(".")[1]))
        elif name.startswith(("patch_embed.", "cls_token", "pos_embed")):
            expected = decay ** (depth + 1)
        else:
            assert name.startswith(("head.", "fc_norm.")), name
            expected = 1.0
        assert scale[id(param)] == pytest.approx(expected), name
        no_decay = param.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert wd[id(param)] == (0.0 if no_decay else 0.05), name
    # The step-based schedule applies each group's scale: lr = schedule(step) x lr_scale.
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    scheduler = CosineLRScheduler(optimizer, t_initial=10, warmup_t=10, warmup_prefix=True, t_in_epochs=False)
    scheduler.step_update(5)  # half-way through the warm-up
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.5 * group["lr_scale"])


def test_a_few_steps_lower_the_training_loss(sample_shards, tmp_path):
    from droppos.finetune import FinetuneStage
    from droppos.loop import MetricWindow, set_lr

    config = make_config(FinetuneConfig, dict(
        data=str(sample_shards), out=str(tmp_path / "ft"), timm_model="vit_tiny_patch16_224", img_size=32, depth=2,
        batch_size=16, epochs=1, warmup_epochs=0, lr=1e-3, mixup=0, cutmix=0, reprob=0, smoothing=0, drop_path=0,
        device="cpu", compile=False, loader="pil", workers=0))
    env = Environment(device="cpu", precision="fp32", compile=False, loader="pil", workers=0, processes_per_node=1,
                      world_size=1)
    stage = FinetuneStage(config, env, DistInfo(0, 1, 0, torch.device("cpu")))
    images, labels = next(stage.loader.epoch(0))
    window = MetricWindow(stage.metrics, torch.device("cpu"))
    losses = []
    set_lr(stage.optimizer, 1e-3)  # the loop's job: each group's lr x its layer-decay lr_scale
    for step in range(8):  # the same batch: the real step (augment, AdamW) must fit it
        window.reset()
        stage.step(step, [(images, labels)], window)
        losses.append(float(window.sums[0]))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.85 * losses[0], losses  # measured: 2.30 -> 1.82
    assert float(window.nonfinite) == 0  # no non-finite step


# --- the command ---------------------------------------------------------------------------


def test_eval_counts_every_val_sample_once_across_two_ranks(sample_shards, tmp_path):
    out = tmp_path / "ft2"
    # 40 val images over 2 ranks, batch 16: 2 batches per rank, 12 padded slots per rank.
    result = process("finetune", "--data", str(sample_shards), "--out", str(out), *TINY, "--nproc", "2",
                     "--epochs", "1", "--warmup-epochs", "0")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["num_eval_samples"] == val_count(sample_shards) == 40
    assert results["epoch"] == 1 and 0 <= results["top1"] <= results["top5"] <= 100
    config = json.loads((out / "config.json").read_text())
    assert config["environment"]["world_size"] == 2


def test_resume_after_sigterm_and_results(sample_shards, tmp_path):
    out = tmp_path / "ft3"
    args = ["finetune", "--data", str(sample_shards), "--out", str(out), *TINY, "--epochs", "40", "--ema"]
    proc = subprocess.Popen([sys.executable, "-m", "droppos", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= 4 for r in metrics(out)):
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    saved = checkpoint.load(out / "checkpoints" / "last.pt")
    stopped_at = saved["step"]
    assert stopped_at >= 4 and "ema" in saved and saved["reason"] == "stopped by SIGTERM"
    # Re-run the same command (plus a step budget): it continues from the saved step.
    result = droppos(*args, "--max-steps", str(stopped_at + 2))
    assert result.returncode == 0, result.stderr
    assert f"from step {stopped_at}" in result.stderr
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == stopped_at + 2
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == stopped_at + 2 and results["num_eval_samples"] == 40
    assert {"top1", "top5", "epoch", "top1_ema", "best_top1"} <= set(results)
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] == stopped_at + 2


def cli_error(capsys, *args: str) -> str:
    """Run the CLI in this process (user mistakes are caught before any worker starts): exit 2, one line."""
    import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, (args, lines)
    return lines[0]


def test_user_mistakes_exit_2_with_one_line(sample_shards, tmp_path, exported, capsys):
    run, _ = exported
    base = ["finetune", "--out", str(tmp_path / "a"), "--data", str(sample_shards), "--device", "cpu"]
    cases = [
        ([], "exactly one"),
        (["--run", str(tmp_path / "nope")], "no such run"),
        (["--encoder", str(tmp_path / "x.safetensors")], "no such file"),
        (["--timm-model", "vit_nope_nope"], "unknown timm model"),
        (["--run", str(run), "--batch-size", "15"], "must be even"),
        (["--run", str(run), "--pool", "max"], "--pool"),
        (["--run", str(run), "--preset", "nope"], "unknown preset"),
        (["--run", str(run), "--batch-size", "512"], "fewer than one"),
        (["--run", str(run), "--epochs", "0"], "--epochs"),
    ]
    for args, message in cases:
        assert message in cli_error(capsys, *base, *args), args
    assert "manifest" in cli_error(capsys, "finetune", "--out", str(tmp_path / "a"), "--data", str(tmp_path), "--run", str(run))
    # A finished run resumed with another encoder is refused, not mixed.
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    checkpoint.save(tmp_path / "b" / "checkpoints" / "last.pt", checkpoint.state(
        {}, stage="finetune", config=to_record(make_config(FinetuneConfig, {"run": str(run)}))))
    line = cli_error(capsys, "finetune", "--out", str(tmp_path / "b"), "--data", str(sample_shards), "--timm-model",
                     "vit_tiny_patch16_224", "--batch-size", "16", "--device", "cpu")
    assert "another model" in line
