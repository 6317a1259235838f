"""droppos/weights.py through `load_encoder`: the checkpoint layouts people download, timm's hub cache,
provenance, and untrusted sidecars. Every checkpoint loaded here is written by the test itself."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import droppos.model  # noqa: F401 - registers the droppos_* timm names
from droppos import UserError
from droppos.encoders import check_encoder_source, load_encoder
from droppos.export import export_encoder, read_source

# timm's own tiny test ViT (64 wide, 6 blocks, patch 16, mlp 192) at 64 px: a 4x4 grid.
ARCH = "test_vit"
IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def vit(seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, img_size=64, **kwargs).eval()


@pytest.fixture(scope="module")
def published() -> dict[str, torch.Tensor]:
    """A 'published' classifier's weights (head of 10 classes), different from any fresh init."""
    return {k: v.clone() for k, v in vit(1, num_classes=10).state_dict().items()}


def encoder_part(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def reference(state: dict, **kwargs) -> torch.nn.Module:
    """A stock timm model holding `state` (strict, no droppos code involved)."""
    model = timm.create_model(ARCH, img_size=64, num_classes=0, **kwargs).eval()
    model.load_state_dict(state, strict=True)
    return model


def same_features(a: torch.nn.Module, b: torch.nn.Module) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval().forward_features(IMAGES), b.eval().forward_features(IMAGES), rtol=0, atol=1e-6)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- layouts ---------------------------------------------------------------------------------


def test_timm_state_dicts_safetensors_pth_and_training_checkpoint(published, tmp_path):
    flat = tmp_path / "model.safetensors"
    save_file(published, str(flat))
    zipped, legacy, train = tmp_path / "model.pth", tmp_path / "legacy.bin", tmp_path / "train.pth.tar"
    torch.save(published, zipped)
    torch.save(published, legacy, _use_new_zipfile_serialization=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in published.items()}, "epoch": 3,
                "args": argparse.Namespace(lr=0.1, model=ARCH)}, train)  # timm's train.py checkpoint
    want = reference(encoder_part(published))
    for path in (flat, zipped, legacy, train):
        model, info = load_encoder(timm_model=ARCH, weights=path, img_size=64, global_pool="token")
        same_features(model, want)
        w = info["weights"]
        assert (w["source"], w["layout"], w["path"], w["sha256"]) == ("file", "timm", str(path), sha256(path))
        assert w["dropped_keys"] == 2 and info["pretrained"] and info["source"] == "weights"
        assert "random-init" not in info["label"]


def test_mae_pretrain_and_finetune_checkpoints(published, tmp_path):
    encoder = encoder_part(published)
    decoder = {"decoder_embed.weight": torch.zeros(32, 64), "decoder_pos_embed": torch.zeros(1, 17, 32),
               "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_norm.weight": torch.ones(32),
               "decoder_pred.weight": torch.zeros(768, 32), "mask_token": torch.zeros(1, 1, 32)}
    pretrain = tmp_path / "mae_pretrain.pth"
    torch.save({"model": {**encoder, **decoder}, "optimizer": {"state": {}}, "epoch": 799,
                "args": argparse.Namespace(mask_ratio=0.75)}, pretrain)
    # Average pooling (MAE's fine-tuning): the final norm is not used, fc_norm starts fresh.
    model, info = load_encoder(timm_model=ARCH, weights=pretrain, img_size=64, global_pool="avg", num_classes=5)
    w = info["weights"]
    assert w["layout"] == "mae-deit" and w["dropped"]["MAE decoder"] == 5 and w["dropped"]["MAE mask token"] == 1
    assert w["dropped"]["final norm (average pooling uses fc_norm)"] == 2 and w["dropped_keys"] == 8
    torch.testing.assert_close(model.blocks[5].mlp.fc2.weight, encoder["blocks.5.mlp.fc2.weight"], rtol=0, atol=0)
    assert torch.equal(model.fc_norm.weight, torch.ones(64)) and model.head.out_features == 5
    # [CLS] pooling keeps the final norm: the features are the published encoder's.
    model, _ = load_encoder(timm_model=ARCH, weights=pretrain, img_size=64, global_pool="token")
    same_features(model, reference(encoder))

    # A fine-tuned MAE (fc_norm, no norm) keeps its fc_norm with average pooling, and needs it.
    tuned = {k: v for k, v in published.items() if not k.startswith("norm.")}
    tuned.update({"fc_norm.weight": torch.full((64,), 2.0), "fc_norm.bias": torch.full((64,), 0.5)})
    finetuned = tmp_path / "mae_finetuned.pth"
    torch.save({"model": tuned}, finetuned)
    model, info = load_encoder(timm_model=ARCH, weights=finetuned, img_size=64, global_pool="avg")
    assert torch.equal(model.fc_norm.weight, torch.full((64,), 2.0)) and info["weights"]["dropped_keys"] == 2
    with pytest.raises(UserError, match="use --pool avg"):
        load_encoder(timm_model=ARCH, weights=finetuned, img_size=64, global_pool="token")


def test_deit_moco_v3_and_dino_layouts(published, tmp_path):
    encoder = encoder_part(published)
    other = encoder_part(vit(2).state_dict())  # a second set of weights: what must NOT be loaded
    deit = tmp_path / "deit_checkpoint.pth"
    torch.save({"model": published, "epoch": 299, "args": argparse.Namespace(model="deit_tiny")}, deit)
    moco = tmp_path / "moco_v3.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "optimizer": {"state": {}, "param_groups": []}, "state_dict": {
        **{f"module.base_encoder.{k}": v for k, v in encoder.items()},
        "module.base_encoder.head.0.weight": torch.zeros(256, 64), "module.base_encoder.head.1.weight": torch.ones(256),
        **{f"module.momentum_encoder.{k}": v for k, v in other.items()},
        "module.predictor.0.weight": torch.zeros(256, 256)}}, moco)
    dino = tmp_path / "dino_checkpoint.pth"
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in encoder.items()}, "head.last_layer.weight_g": torch.ones(1)},
                "student": {**{f"module.backbone.{k}": v for k, v in other.items()},
                            "module.head.mlp.0.weight": torch.zeros(8, 64)},
                "epoch": 100, "args": argparse.Namespace(arch="vit_small")}, dino)
    want = reference(encoder)
    expected = {deit: ("mae-deit", 2, None), moco: ("moco-v3", 2 + 1 + len(other), None), dino: ("dino", 1, "teacher")}
    for path, (layout, dropped, branch) in expected.items():
        model, info = load_encoder(timm_model=ARCH, weights=path, img_size=64, global_pool="token")
        same_features(model, want)
        w = info["weights"]
        assert (w["layout"], w["dropped_keys"], w.get("branch")) == (layout, dropped, branch), path.name


def test_position_embedding_resampled_with_timms_filter(published, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(published, str(path))
    model, info = load_encoder(timm_model=ARCH, weights=path, img_size=96, global_pool="token")
    expected = resample_abs_pos_embed(published["pos_embed"], new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert info["weights"]["pos_embed_resampled"] == {"from_tokens": 17, "to_grid": [6, 6]}
    assert info["img_size"] == (96, 96)


def test_droppos_export_and_pretrain_checkpoint_name_their_architecture(tmp_path):
    torch.manual_seed(3)
    droppos_model = timm.create_model("droppos_vit_tiny_patch16", img_size=32, patch_size=8, depth=2).eval()
    encoder = export_encoder(droppos_model, tmp_path / "encoder.safetensors")
    config = {"model": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 2,
              "mask_ratio": 0.75, "pos_mask_ratio": 0.75, "mask_token": "learnable"}
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": droppos_model.state_dict(), "config": config, "step": 7, "optimizer": {}}, checkpoint)
    images = torch.randn(2, 3, 32, 32)
    for path, layout, source in ((encoder, "droppos-export", "droppos-export"),
                                 (checkpoint, "droppos-checkpoint", "file")):
        model, info = load_encoder(weights=path, global_pool="token")
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(images), droppos_model.forward_features(images),
                                       rtol=0, atol=1e-5)
        assert (info["weights"]["layout"], info["weights"]["source"], info["model"]) == (layout, source, "vit_tiny_patch16_224")
    _, info = load_encoder(weights=checkpoint)
    assert info["weights"]["dropped"]["DropPos position decoder, [MASK] token and auxiliary decoder"] > 0
    # The same file through --encoder / --run reports the same provenance.
    _, info = load_encoder(run=tmp_path, global_pool="token")
    assert info["weights"]["source"] == "droppos-export" and info["weights"]["sha256"] == sha256(encoder)
    # A pretrain checkpoint whose config disagrees with its tensors is refused before it is built.
    torch.save({"model": droppos_model.state_dict(), "config": dict(config, img_size=64)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="do not match the model its config describes"):
        load_encoder(weights=tmp_path / "bad.pt")
    torch.save({"model": droppos_model.state_dict(), "config": dict(config, img_size=48000)}, tmp_path / "huge.pt")
    with pytest.raises(UserError, match="img_size must be an integer in 1..4096"):
        load_encoder(weights=tmp_path / "huge.pt")


def test_foreign_checkpoint_mistakes_are_one_line(published, tmp_path):
    def saved(name: str, obj) -> Path:
        path = tmp_path / name
        torch.save(obj, path)
        return path

    marker = tmp_path / "pwned"
    planted = saved("planted.pth", {"model": published, "x": _Planted(str(marker))})
    no_blocks = {k: v for k, v in published.items() if not k.startswith("blocks.3.norm1")}
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    cases = [
        (dict(weights=planted), "refused to unpickle"),
        (dict(weights=saved("other.pth", {"foo": 1, "bar": [2]})), "matches no known checkpoint layout"),
        (dict(weights=saved("partial.pth", {"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}})),
         "misses encoder keys: cls_token, pos_embed, patch_embed.proj.weight"),
        (dict(weights=saved("holes.pth", no_blocks)), r"misses encoder keys: blocks\.3\.norm1\.bias"),
        (dict(weights=saved("distilled.pth", dict(published, dist_token=torch.zeros(1, 1, 64)))),
         f"has keys {ARCH} does not have: dist_token"),
        (dict(weights=text), "neither a safetensors file nor a PyTorch checkpoint"),
        (dict(weights=tmp_path / "missing.pth"), "no such file"),
        (dict(weights=tmp_path), "a directory"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            load_encoder(timm_model=ARCH, img_size=64, global_pool="token", **kwargs)
    assert not marker.exists()  # the planted pickle never ran
    with pytest.raises(UserError, match=r"embed 64, depth 6.*vit_tiny_patch16_224 has embed 192"):
        load_encoder(timm_model="vit_tiny_patch16_224", weights=saved("w.pth", published), img_size=64)
    with pytest.raises(UserError, match="does not name its architecture: add --timm-model"):
        load_encoder(weights=tmp_path / "w.pth")
    with pytest.raises(UserError, match="--depth only applies"):
        load_encoder(timm_model=ARCH, weights=tmp_path / "w.pth", depth=2)


class _Planted:
    """A pickle that would create a file when unpickled (if anything ran it)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# --- random-init, naming ---------------------------------------------------------------------


def test_random_init_is_called_that(tmp_path):
    model, info = load_encoder(timm_model=ARCH, img_size=64)
    assert not info["pretrained"] and info["weights"]["source"] == "random-init" and info["weights"]["sha256"] is None
    assert info["label"] == f"random-init {ARCH}"
    with pytest.raises(UserError, match="names pretrained weights .*add --pretrained"):
        load_encoder(timm_model=f"{ARCH}.r160_in1k")
    with pytest.raises(UserError, match="--pretrained loads timm's own weights"):
        load_encoder(timm_model=ARCH, pretrained=True, weights=tmp_path / "x.pth")
    torch.manual_seed(0)
    droppos_model = timm.create_model("droppos_vit_tiny_patch16", img_size=32, patch_size=8, depth=2)
    export_encoder(droppos_model, tmp_path / "encoder.safetensors")
    _, info = load_encoder(run=tmp_path, random_init=True)
    assert info["label"].startswith("random-init vit_tiny_patch16_224") and info["weights"]["source"] == "random-init"


# --- timm's pretrained weights through the hub cache -------------------------------------------


def _fake_hub_entry(hub: Path, repo_name: str, state: dict) -> Path:
    """The Hugging Face cache layout huggingface_hub writes: blobs/<sha256>, snapshots/<rev>/FILE -> blob, refs/main."""
    root = hub / f"models--timm--{repo_name}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (root / "blobs").mkdir(parents=True)
    staging = root / "blobs" / "staging"
    save_file(state, str(staging))
    blob = root / "blobs" / sha256(staging)
    staging.rename(blob)
    (root / "snapshots" / revision).mkdir(parents=True)
    link = root / "snapshots" / revision / "model.safetensors"
    link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    return blob


def test_pretrained_from_the_hub_cache_offline(tmp_path):
    """HF_HOME + HF_HUB_OFFLINE=1 in a fresh process, as a user sets them: cached weights load (the very file
    timm itself reads), missing ones are one line saying how to get them; no network is touched."""
    torch.manual_seed(4)  # at timm's own size for these weights (160 px: 10x10 patches)
    weights = {k: v.clone() for k, v in timm.create_model(ARCH, num_classes=1000).state_dict().items()}
    blob = _fake_hub_entry(tmp_path / "hf" / "hub", "test_vit.r160_in1k", weights)
    save_file(weights, str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent(f"""
        import json, timm, torch
        from safetensors.torch import load_file
        from droppos import UserError
        from droppos.encoders import check_encoder_source, load_encoder
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        out = {{}}
        check_encoder_source(timm_model="{ARCH}", pretrained=True)
        model, info = load_encoder(timm_model="{ARCH}", pretrained=True, img_size=64, global_pool="token")
        out["info"] = info["weights"]; out["label"] = info["label"]
        out["blocks_equal"] = all(torch.equal(v, model.state_dict()[k]) for k, v in expected.items() if k.startswith("blocks."))
        stock = timm.create_model("{ARCH}.r160_in1k", pretrained=True)  # timm's own loader, same cache
        out["timm_reads_it"] = all(torch.equal(v, stock.state_dict()[k]) for k, v in expected.items())
        for name in ("test_vit2.r160_in1k", "test_vit.nope", "test_vit4"):
            try:
                load_encoder(timm_model=name, pretrained=True)
                out[name] = "loaded"
            except UserError as err:
                out[name] = str(err)
        print(json.dumps(out))
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    w = out["info"]
    assert w["source"] == "timm-hub" and w["timm_name"] == "test_vit.r160_in1k" and w["sha256"] == blob.name
    assert w["path"].endswith("snapshots/0123456789abcdef0123456789abcdef01234567/model.safetensors")
    assert w["dropped_keys"] == 2 and w["pos_embed_resampled"] == {"from_tokens": 101, "to_grid": [4, 4]}
    assert out["blocks_equal"] and out["timm_reads_it"] and out["label"] == "test_vit.r160_in1k (timm hub weights)"
    missing = out["test_vit2.r160_in1k"]
    assert "not in the Hugging Face cache" in missing and "HF_HUB_OFFLINE=1" in missing
    assert "hf download timm/test_vit2.r160_in1k" in missing and "--weights FILE" in missing and "\n" not in missing
    assert "no pretrained weights named 'test_vit.nope'" in out["test_vit.nope"]
    assert "no Hugging Face hub weights for test_vit4" in out["test_vit4"]


# --- untrusted sidecars ------------------------------------------------------------------------


class CreateCalled(Exception):
    """Raised by a stand-in for timm.create_model: validation let something through."""


@pytest.fixture(scope="module")
def exported_encoder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("droppos_vit_tiny_patch16", img_size=32, patch_size=8, depth=2)
    return export_encoder(model, tmp_path_factory.mktemp("enc") / "encoder.safetensors")


SIDECAR_ATTACKS = [
    ("img_size", lambda m: m["model_args"].update(img_size=48000), "img_size must be an integer in 1..4096"),
    ("img_size pair", lambda m: m["model_args"].update(img_size=[32, 48000]), "img_size must be an integer in 1..4096"),
    ("tokens", lambda m: m["model_args"].update(img_size=4096, patch_size=8), "65536 patches|at most 65536"),
    ("embed_dim", lambda m: m["model_args"].update(embed_dim=10 ** 6), "embed_dim must be an integer in 1..8192"),
    ("depth", lambda m: m["model_args"].update(depth=100000), "depth must be an integer in 1..256"),
    ("heads", lambda m: m["model_args"].update(num_heads=5), "not divisible by num_heads 5"),
    ("bool", lambda m: m["model_args"].update(depth=True), "depth must be an integer"),
    ("string", lambda m: m["model_args"].update(depth="2"), "depth must be an integer"),
    ("mlp_ratio", lambda m: m["model_args"].update(mlp_ratio=1e9), "mlp_ratio must be a number"),
    ("checkpoint_path", lambda m: m.update(checkpoint_path="/etc/passwd"), "unknown key checkpoint_path in the sidecar"),
    ("kwarg", lambda m: m["model_args"].update(checkpoint_path="/etc/passwd"), "unknown key checkpoint_path in model_args"),
    ("overlay", lambda m: m["model_args"].update(pretrained_cfg_overlay={"file": "/etc/passwd"}), "unknown key pretrained_cfg_overlay"),
    ("local-dir", lambda m: m.update(model="local-dir:/tmp"), "'model' must name a timm VisionTransformer"),
    ("hf-hub", lambda m: m.update(model="hf-hub:timm/vit_tiny_patch16_224"), "'model' must name a timm VisionTransformer"),
    ("not a vit", lambda m: m.update(model="resnet50"), "'model' must name a timm VisionTransformer"),
    ("tag", lambda m: m.update(model="vit_tiny_patch16_224.augreg_in21k"), "'model' must name a timm VisionTransformer"),
    ("missing", lambda m: m["model_args"].pop("depth"), "model_args lacks depth"),
    ("interpolation", lambda m: m["pretrained_cfg"].update(interpolation="../../x"), "interpolation must be a short name"),
    ("cfg key", lambda m: m["pretrained_cfg"].update(file="/etc/passwd"), "unknown key file in pretrained_cfg"),
    ("mask token", lambda m: m["droppos"].update(mask_token="evil"), "mask_token must be a short name"),
    ("not the weights", lambda m: m["model_args"].update(embed_dim=8192, num_heads=8), "does not match the weights beside it"),
    ("depth vs file", lambda m: m["model_args"].update(depth=3), "does not match the weights beside it"),
]


@pytest.mark.parametrize("name,mutate,message", SIDECAR_ATTACKS, ids=[a[0] for a in SIDECAR_ATTACKS])
def test_sidecar_rejected_before_anything_is_built(exported_encoder, tmp_path, monkeypatch, name, mutate, message):
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(exported_encoder.read_bytes())
    meta = json.loads(exported_encoder.with_suffix(".json").read_text())
    mutate(meta)
    path.with_suffix(".json").write_text(json.dumps(meta))

    def create_model(*args, **kwargs):
        raise CreateCalled(f"timm.create_model{args} {sorted(kwargs)}")

    monkeypatch.setattr(timm, "create_model", create_model)
    for load in (lambda: load_encoder(encoder=path), lambda: check_encoder_source(encoder=path),
                 lambda: load_encoder(weights=path), lambda: read_source(path)):
        with pytest.raises(UserError, match=message) as caught:
            load()
        assert "\n" not in str(caught.value)


def test_sidecar_file_itself_is_bounded(exported_encoder, tmp_path, monkeypatch):
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(exported_encoder.read_bytes())
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: (_ for _ in ()).throw(CreateCalled()))
    text = exported_encoder.with_suffix(".json").read_text()
    for content, message in ((text.replace('"mlp_ratio": 4.0', '"mlp_ratio": NaN'), "NaN is not a JSON number"),
                             (text[:-3] + " " * (1 << 20) + text[-3:], "refused"),
                             ("[1, 2]", "the sidecar must be an object"),
                             ("{not json", "is not valid JSON")):
        path.with_suffix(".json").write_text(content)
        with pytest.raises(UserError, match=message):
            load_encoder(encoder=path)


def test_file_kind_reads_content_not_names(published, tmp_path):
    """A safetensors header length may begin with byte 0x80 (a pickle's first byte); names say nothing."""
    from safetensors.torch import save

    for pad in range(300):
        data = save(published, metadata={"format": "pt", "x": "y" * pad})
        if data[0] == 0x80:
            break
    assert data[0] == 0x80
    path = tmp_path / "looks_like_a.pth"
    path.write_bytes(data)
    model, info = load_encoder(timm_model=ARCH, weights=path, img_size=64, global_pool="token")
    assert info["weights"]["layout"] == "timm"
    same_features(model, reference(encoder_part(published)))
