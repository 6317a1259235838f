"""droppos/export.py: the byte-reproducible encoder, and the timm / Detectron2 / MMSegmentation exports.

The key layouts expected for Detectron2 and MMSegmentation are written out here independently of
export.py, from the libraries' model code (detectron2/modeling/backbone/vit.py;
mmseg/models/backbones/mae.py, beit.py and tools/model_converters/beit2mmseg.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import droppos.model  # noqa: F401 - registers the droppos_* timm names
from droppos import UserError
from droppos.encoders import load_encoder
from droppos.export import downstream_command, export_encoder, read_source, run
from droppos.model import encoder_state_dict

DIM, DEPTH, PATCH, IMG = 192, 2, 8, 32  # a tiny DropPos ViT-Ti: 4x4 patches
TOKENS = (IMG // PATCH) ** 2
IMAGES = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pretrain run directory as pretrain leaves it: encoder + sidecar and checkpoints/last.pt."""
    torch.manual_seed(0)
    model = timm.create_model("droppos_vit_tiny_patch16", img_size=IMG, patch_size=PATCH, depth=DEPTH).eval()
    with torch.no_grad():  # weights no init would give (so a fresh model cannot pass for it)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    run_dir = tmp_path_factory.mktemp("run")
    export_encoder(model, run_dir / "encoder.safetensors")
    config = {"model": "vit_tiny_patch16", "img_size": IMG, "patch_size": PATCH, "depth": DEPTH,
              "mask_ratio": 0.75, "pos_mask_ratio": 0.75, "mask_token": "learnable"}
    (run_dir / "checkpoints").mkdir()
    torch.save({"model": model.state_dict(), "config": config, "step": 5}, run_dir / "checkpoints" / "last.pt")
    return run_dir, model


# --- the released encoder ----------------------------------------------------------------------


def test_encoder_export_is_byte_reproducible(trained, tmp_path):
    run_dir, model = trained
    paths = [export_encoder(torch.compile(model) if i == 1 else model, tmp_path / f"e{i}" / "encoder.safetensors")
             for i in range(4)]
    for path in paths[1:]:
        assert path.read_bytes() == paths[0].read_bytes()
        assert path.with_suffix(".json").read_bytes() == paths[0].with_suffix(".json").read_bytes()
    assert paths[0].read_bytes() == (run_dir / "encoder.safetensors").read_bytes()
    # Another process, the same weights: the same bytes (safetensors' metadata map is ordered per process).
    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)
    script = textwrap.dedent(f"""
        import timm, torch
        import droppos.model
        from droppos.export import export_encoder
        model = timm.create_model("droppos_vit_tiny_patch16", img_size={IMG}, patch_size={PATCH}, depth={DEPTH})
        model.load_state_dict(torch.load({str(state)!r}))
        export_encoder(model, {str(tmp_path / "other" / "encoder.safetensors")!r})
    """)
    subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], check=True, timeout=600)
    assert (tmp_path / "other" / "encoder.safetensors").read_bytes() == paths[0].read_bytes()
    assert (tmp_path / "other" / "encoder.json").read_bytes() == paths[0].with_suffix(".json").read_bytes()
    # Sidecar keys sorted; no temporaries left behind.
    meta = json.loads(paths[0].with_suffix(".json").read_text())
    assert list(meta) == sorted(meta) and list(meta["model_args"]) == sorted(meta["model_args"])
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["encoder.json", "encoder.safetensors"]


def test_encoder_export_reloads_equal(trained):
    run_dir, model = trained
    path = run_dir / "encoder.safetensors"
    saved = load_file(str(path))
    expected = encoder_state_dict(model)
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
    meta = json.loads(path.with_suffix(".json").read_text())
    stock = timm.create_model(meta["model"], pretrained=True, num_classes=0, **meta["model_args"],
                              pretrained_cfg_overlay=dict(meta["pretrained_cfg"], file=str(path), custom_load=False))
    with torch.no_grad():
        torch.testing.assert_close(stock.eval().forward_features(IMAGES), model.forward_features(IMAGES), rtol=0, atol=1e-5)


def test_encoder_export_errors_are_one_line(trained, tmp_path):
    _, model = trained
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write .*a parent of it is a file"):
        export_encoder(model, tmp_path / "file" / "encoder.safetensors")
    with pytest.raises(UserError, match="must end in .safetensors"):
        export_encoder(model, tmp_path / "encoder.pt")


# --- droppos export ----------------------------------------------------------------------------


def test_timm_folder_loads_through_local_dir(trained, tmp_path):
    run_dir, model = trained
    out = run(run_dir, "timm", tmp_path / "hub")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["model_args"] == {"img_size": [IMG, IMG], "patch_size": PATCH, "embed_dim": DIM, "depth": DEPTH,
                                    "num_heads": 3, "mlp_ratio": 4.0}
    assert config["pretrained_cfg"]["input_size"] == [3, IMG, IMG] and config["pretrained_cfg"]["num_classes"] == 0
    stock = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock.forward_features(IMAGES), model.forward_features(IMAGES), rtol=0, atol=1e-5)
    # The same weights from the pretrain checkpoint give the same bytes.
    again = run(run_dir / "checkpoints" / "last.pt", "timm", tmp_path / "hub2")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (again / "config.json").read_bytes() == (out / "config.json").read_bytes()
    # Our loader reads the folder's weights as a timm state dict, and says when a name does not fit them.
    with pytest.raises(UserError, match="holds a ViT with embed 192, depth 2, patch 8x8"):
        load_encoder(timm_model="vit_tiny_patch16_224", weights=out / "model.safetensors")


def detectron2_expected() -> dict[str, tuple[int, ...]]:
    """Detectron2 ViT parameter names (vit.py) as MAE's checkpoint spells them, with the [CLS] row in pos_embed."""
    keys = {"cls_token": (1, 1, DIM), "pos_embed": (1, 1 + TOKENS, DIM),
            "patch_embed.proj.weight": (DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": (DIM,)}
    for i in range(DEPTH):
        for name, shape in (("norm1.weight", (DIM,)), ("norm1.bias", (DIM,)), ("attn.qkv.weight", (3 * DIM, DIM)),
                            ("attn.qkv.bias", (3 * DIM,)), ("attn.proj.weight", (DIM, DIM)), ("attn.proj.bias", (DIM,)),
                            ("norm2.weight", (DIM,)), ("norm2.bias", (DIM,)), ("mlp.fc1.weight", (4 * DIM, DIM)),
                            ("mlp.fc1.bias", (4 * DIM,)), ("mlp.fc2.weight", (DIM, 4 * DIM)), ("mlp.fc2.bias", (DIM,))):
            keys[f"blocks.{i}.{name}"] = shape
    return keys


def test_detectron2_checkpoint_in_maes_layout(trained, tmp_path):
    run_dir, model = trained
    path = run(run_dir, "detectron2", tmp_path / "vitdet.pth")
    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["model"]
    state = saved["model"]
    assert {k: tuple(v.shape) for k, v in state.items()} == detectron2_expected()
    timm_state = encoder_state_dict(model)
    for key, value in state.items():
        assert torch.equal(value, timm_state[key]), key
    # Detectron2's matching heuristic: each checkpoint key is a '.'-suffix of exactly one ViTDet model key.
    vitdet_keys = [f"backbone.net.{k}" for k in state if k != "cls_token"] + [
        "backbone.simfp_2.4.norm.weight", "backbone.simfp_3.1.norm.weight", "roi_heads.box_head.fc1.weight"]
    for key in state:
        hits = [m for m in vitdet_keys if m == key or m.endswith("." + key)]
        assert len(hits) == (0 if key == "cls_token" else 1), (key, hits)
    assert "--config-file projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py" in downstream_command(
        "detectron2", path, read_source(run_dir).meta)


def mmseg_name(key: str) -> str:
    """MMSegmentation's MAE backbone names (beit2mmseg.convert_beit; final norm as BEiT's final_norm ln1)."""
    if key.startswith("blocks."):
        key = "layers." + key[len("blocks."):]
        key = re.sub(r"\.norm(\d)\.", r".ln\1.", key)
        return key.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
    if key.startswith("patch_embed.proj."):
        return key.replace("patch_embed.proj.", "patch_embed.projection.")
    if key.startswith("norm."):
        return key.replace("norm.", "ln1.")
    return key


def test_mmseg_checkpoint_in_the_mae_backbone_layout(trained, tmp_path):
    run_dir, model = trained
    path = run(run_dir / "encoder.safetensors", "mmseg", tmp_path)
    assert path == tmp_path / "encoder_mmseg.pth"
    state = torch.load(path, weights_only=True)
    timm_state = encoder_state_dict(model)
    assert set(state) == {mmseg_name(k) for k in timm_state}
    for key, value in timm_state.items():
        assert torch.equal(state[mmseg_name(key)], value), key
    assert state["layers.1.ffn.layers.0.0.weight"].shape == (4 * DIM, DIM)
    assert state["layers.1.ffn.layers.1.weight"].shape == (DIM, 4 * DIM)
    assert state["layers.0.attn.qkv.bias"].shape == (3 * DIM,) and state["pos_embed"].shape == (1, 1 + TOKENS, DIM)
    assert state["patch_embed.projection.weight"].shape == (DIM, 3, PATCH, PATCH)
    command = downstream_command("mmseg", path, read_source(run_dir).meta)
    assert command.startswith("bash tools/dist_train.sh configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py 8 "
                              f"--cfg-options model.pretrained={path}")
    for override in ("model.backbone.embed_dims=192", "model.backbone.num_layers=2", "model.backbone.num_heads=3",
                     "model.backbone.patch_size=8", "model.neck.embed_dim=192", "optim_wrapper.paramwise_cfg.num_layers=2"):
        assert override in command


def test_downstream_commands_for_vit_b16_need_no_overrides():
    meta = {"model_args": {"img_size": [224, 224], "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12,
                           "mlp_ratio": 4.0}}
    assert downstream_command("detectron2", "x.pth", meta) == (
        "python tools/lazyconfig_train_net.py --num-gpus 8 --config-file "
        "projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py 'train.init_checkpoint=x.pth?matching_heuristics=True'")
    assert downstream_command("mmseg", "x.pth", meta).endswith("--cfg-options model.pretrained=x.pth")
    small = dict(meta["model_args"], img_size=[32, 32])
    assert "model.backbone.net.pretrain_img_size=32" in downstream_command("detectron2", "x.pth", {"model_args": small})


def test_export_mistakes_are_one_line(trained, tmp_path):
    run_dir, _ = trained
    torch.manual_seed(0)
    wide = timm.create_model("droppos_vit_tiny_patch16", img_size=(32, 64), patch_size=PATCH, depth=DEPTH)
    export_encoder(wide, tmp_path / "wide" / "encoder.safetensors")
    (tmp_path / "afile").write_text("x")
    cases = [
        ((run_dir, "onnx", tmp_path / "x"), "--format 'onnx': choose one of timm, detectron2, mmseg"),
        ((tmp_path / "nothing", "timm", tmp_path / "x"), "no such file or directory"),
        ((tmp_path / "afile", "timm", tmp_path / "x"), "neither a safetensors file nor a PyTorch checkpoint"),
        ((tmp_path, "timm", tmp_path / "x"), "neither encoder.safetensors nor checkpoints/last.pt"),
        ((run_dir, "timm", tmp_path / "afile"), "is a file: the timm format is a folder"),
        ((tmp_path / "wide", "detectron2", tmp_path / "d.pth"), "needs a square patch grid"),
        ((tmp_path / "wide", "mmseg", tmp_path / "m.pth"), "needs a square patch grid"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            run(*args)
    # An encoder whose tensors are not those its (valid) sidecar names.
    (tmp_path / "swap").mkdir()
    from safetensors.torch import save_file

    state = load_file(str(run_dir / "encoder.safetensors"))
    state["blocks.0.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "swap" / "encoder.safetensors"))
    (tmp_path / "swap" / "encoder.json").write_bytes((run_dir / "encoder.json").read_bytes())
    with pytest.raises(UserError, match=r"not the encoder its sidecar describes \(e.g. blocks.0.extra\)"):
        run(tmp_path / "swap", "timm", tmp_path / "y")
