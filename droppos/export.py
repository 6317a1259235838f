"""Every file we hand to other software: the released encoder, and exports for timm, Detectron2 and MMSegmentation.

`export_encoder` writes what a pretrain run releases: `encoder.safetensors` in timm's ViT key layout and the
`encoder.json` sidecar naming the timm model, both byte-reproducible. `run` (`droppos export SOURCE --format F
--out PATH`) reads a run directory, a pretrain checkpoint or an encoder, and writes one format. Neither Detectron2
nor MMSegmentation installs here, so each format's function cites the library code its layout was read from;
`downstream_command` gives the training command with the overrides a non-ViT-B/16 or non-224 encoder needs.

Where an export goes (`run`): `files.claim_output` on the folder that receives it (the parent of --out, or --out
when it is an existing folder for the .pth formats): apart from SOURCE, no other command's output, locked. A file
or folder already there is replaced only when it is recognisably a droppos export (`is_export_pth`,
`is_timm_export`); the timm folder is staged and swapped in whole (`files.publish`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

from droppos import UserError
from droppos import files
from droppos.files import atomic_write, json_text, write_bytes_atomic, write_text_atomic

__all__ = ["FORMATS", "Encoder", "detectron2_state", "downstream_command", "encoder_meta", "export_encoder",
           "is_export_pth", "is_timm_export", "mmseg_state", "read_source", "run", "safetensors_bytes",
           "timm_config", "write_timm_folder"]

from droppos.recipes import EXPORT_FORMATS as FORMATS  # noqa: E402 - the one list of formats

_DETECTRON2_CONFIG = "projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py"  # 64 images per batch on 8 GPUs
# MMSegmentation 1.x; 0.x named it upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py
_MMSEG_CONFIG = "configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py"
_BASE_ARCH = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0}  # both configs'


# ---------------------------------------------------------------------------------------------
# The released encoder


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes that depend on the tensors only.

    safetensors orders the tensors itself, but keeps `__metadata__` in a hash map whose order changes from
    process to process (docs/measurements.md), so the metadata is one entry, whose order cannot vary.
    """
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and a final newline: the same object, the same bytes."""
    return json_text(obj, indent=2, sort_keys=True) + "\n"


def pretrained_cfg_for(model_args: dict) -> dict[str, Any]:
    """timm's preprocessing record for an encoder of this architecture (ImageNet mean/std, bicubic)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    height, width = model_args["img_size"]
    return {
        "input_size": [model_args.get("in_chans", 3), height, width],
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": list(IMAGENET_DEFAULT_MEAN),
        "std": list(IMAGENET_DEFAULT_STD),
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def encoder_meta(model: nn.Module) -> dict[str, Any]:
    """The sidecar of a DropPos encoder: timm model name, model_args, pretrained_cfg and the pretext options."""
    from droppos.model import droppos_core

    core = droppos_core(model)
    model_args = core.timm_model_args()
    if core.in_chans != 3:
        model_args["in_chans"] = core.in_chans
    return {
        "model": core.timm_name,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg_for(model_args),
        "droppos": {
            "mask_ratio": core.mask_ratio,
            "pos_mask_ratio": core.pos_mask_ratio,
            "mask_token": core.mask_token_type,
            "attentive": core.attentive,
            "aux_mae": core.aux_mae,
        },
    }


def export_encoder(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write `path` (.safetensors, timm's ViT layout) and `<stem>.json` beside it; byte-reproducible.

    Load it with `droppos.encoders.load_encoder(encoder=path)`, or in plain timm:
        meta = json.load(open(json_path))
        timm.create_model(meta["model"], pretrained=True, num_classes=0, **meta["model_args"],
                          pretrained_cfg_overlay=dict(meta["pretrained_cfg"], file=path, custom_load=False))
    """
    from droppos.model import droppos_core, encoder_state_dict

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"encoder path {path} must end in .safetensors")
    core = droppos_core(model)
    write_bytes_atomic(path, safetensors_bytes(encoder_state_dict(core)))
    write_text_atomic(path.with_suffix(".json"), canonical_json(encoder_meta(core)))
    return path


# ---------------------------------------------------------------------------------------------
# Reading what to export


@dataclass
class Encoder:
    """An encoder in timm's ViT key layout with the architecture that holds it."""

    state: dict[str, torch.Tensor]
    meta: dict[str, Any]  # model, model_args, pretrained_cfg (droppos: the pretext options, when known)
    origin: Path  # the file it was read from


def read_source(source: Union[str, Path]) -> Encoder:
    """A pretrain run directory, a pretrain checkpoint (.pt) or an encoder .safetensors (with its sidecar)."""
    from droppos import weights
    from droppos.model import encoder_state_dict

    path = Path(source)
    if path.is_dir():
        for candidate in (path / "encoder.safetensors", path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise UserError(f"{source} holds neither encoder.safetensors nor checkpoints/last.pt: is it a pretrain run?")
    elif not path.is_file():
        raise UserError(f"{source}: no such file or directory (give a pretrain run, its checkpoint or its encoder)")
    if weights.file_kind(path) == "safetensors":
        meta = weights.read_sidecar(path)
        meta.setdefault("pretrained_cfg", pretrained_cfg_for(meta["model_args"]))
        encoder = Encoder(weights.load_safetensors(path), meta, path)
        _check_timm_keys(encoder)
        return encoder
    model = weights.read_droppos_checkpoint(path)
    return Encoder(encoder_state_dict(model), encoder_meta(model), path)


def _check_timm_keys(encoder: Encoder) -> None:
    """The tensors are exactly those of the timm model the sidecar names (built on the meta device: no memory)."""
    import timm

    with torch.device("meta"):
        shell = timm.create_model(encoder.meta["model"], pretrained=False, num_classes=0, **encoder.meta["model_args"])
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in encoder.state.items()}
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise UserError(f"{encoder.origin} is not the encoder its sidecar describes (e.g. {', '.join(diff[:3])})")


def _square_grid(encoder: Encoder, fmt: str) -> int:
    """Detectron2 and MMSegmentation resample pos_embed as a square grid: its side."""
    tokens = int(encoder.state["pos_embed"].shape[1]) - 1
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise UserError(f"{fmt} needs a square patch grid; {encoder.origin} has {tokens} patches "
                        f"({encoder.meta['model_args']['img_size']} px): re-export a square encoder")
    return side


# ---------------------------------------------------------------------------------------------
# Formats


def timm_config(encoder: Encoder) -> dict[str, Any]:
    """The timm folder's config.json."""
    return {
        "architecture": encoder.meta["model"],
        "num_classes": 0,
        "num_features": int(encoder.meta["model_args"]["embed_dim"]),
        "global_pool": "token",
        "model_args": encoder.meta["model_args"],
        "pretrained_cfg": dict(encoder.meta["pretrained_cfg"], num_classes=0),
    }


TIMM_FILES = ("config.json", "model.safetensors")


def write_timm_folder(encoder: Encoder, out: Path) -> Path:
    """OUT/config.json + OUT/model.safetensors: what `timm.create_model("local-dir:OUT", pretrained=True)` reads.

    The Hugging Face Hub layout (timm >= 1.0.20), read from timm/models/_hub.py (load_model_config_from_path,
    _parse_model_cfg, load_state_dict_from_path) and timm/models/_factory.py (_resolve_model_source).
    Both files are staged beside OUT and the folder is swapped in whole (call it under `claim_output` of
    OUT's parent): a full disk or a crash leaves the previous folder as it was.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: the timm format is a folder (config.json + model.safetensors)")
    with files.publish(out.parent) as staged:
        staged.write_bytes(f"{out.name}/model.safetensors", safetensors_bytes(encoder.state))
        staged.write_text(f"{out.name}/config.json", canonical_json(timm_config(encoder)))
    return out


# ---------------------------------------------------------------------------------------------
# Recognising a previous export (the only thing an export replaces)

_BLOCK_KEYS = tuple(f"{layer}.{param}" for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                    for param in ("weight", "bias"))
_CONFIG_KEYS = {"architecture", "num_classes", "num_features", "global_pool", "model_args", "pretrained_cfg"}


def timm_layout_keys(depth: int) -> set[str]:
    """The tensor names of an encoder in timm's ViT layout (what `encoder_state_dict` holds) of `depth` blocks."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    return keys | {f"blocks.{i}.{key}" for i in range(depth) for key in _BLOCK_KEYS}


def _depth(keys: set[str], prefix: str) -> int:
    return len({k.split(".")[1] for k in keys if k.startswith(prefix) and k.count(".") > 1})


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_export_pth(path: Path) -> bool:
    """Whether `path` is a .pth a droppos export wrote: a regular file (no link) holding exactly the keys of the
    Detectron2 layout ({'model': ...}) or of the MMSegmentation layout, for some depth >= 1, all tensors."""
    if not _regular(path):
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint, not plain tensors: not ours  # noqa: BLE001
        return False
    if isinstance(saved, dict) and list(saved) == ["model"] and isinstance(saved["model"], dict):
        state = saved["model"]
        expected = {k for k in timm_layout_keys(_depth(set(state), "blocks.")) if not k.startswith("norm.")}
    elif isinstance(saved, dict):
        state = saved
        expected = {_mmseg_name(k) for k in timm_layout_keys(_depth(set(state), "layers."))}
    else:
        return False
    return len(expected) > 6 and set(state) == expected and all(isinstance(v, torch.Tensor) for v in state.values())


def is_timm_export(folder: Path) -> bool:
    """Whether `folder` (a folder, not a link) holds nothing, or exactly a droppos timm export: config.json with
    the keys `timm_config` writes (num_classes 0) and model.safetensors with the tensors of its depth."""
    if os.path.islink(folder) or not folder.is_dir():
        return False
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return False
    if not names:
        return True
    if names != sorted(TIMM_FILES) or not all(_regular(folder / n) for n in names):
        return False
    try:
        config = files.read_json_input(folder / "config.json", "config.json", max_bytes=1 << 20)
    except UserError:
        return False
    if not (isinstance(config, dict) and set(config) == _CONFIG_KEYS and config["num_classes"] == 0
            and isinstance(config["architecture"], str) and isinstance(config["model_args"], dict)
            and isinstance(config["model_args"].get("depth"), int)):
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
            keys, metadata = set(weights.keys()), weights.metadata()
    except Exception:  # noqa: BLE001 - not a safetensors file
        return False
    return metadata == {"format": "pt"} and keys == timm_layout_keys(config["model_args"]["depth"])


def detectron2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAE's key layout (timm's: the names of Detectron2's ViT) without the final norm, which ViTDet does not have.

    Read from detectron2/modeling/backbone/vit.py (pos_embed with its [CLS] row, pretrain_use_cls_token=True,
    resampled by get_abs_pos on a square grid) and detectron2/checkpoint/c2_model_loading.py
    (align_and_update_state_dicts: `?matching_heuristics=True` matches each key as a '.'-suffix of a model key and
    raises when one key matches two of the same shape). That is why `norm.*` goes: at width 256, `norm.weight` would
    match the feature pyramid's `*.norm.weight` of the same shape. The [CLS] token stays, as in MAE's file (unused).
    """
    return {k: v for k, v in state.items() if not k.startswith("norm.")}


_MMSEG_BLOCK_RENAMES = (("norm1.", "ln1."), ("norm2.", "ln2."), ("mlp.fc1.", "ffn.layers.0.0."),
                        ("mlp.fc2.", "ffn.layers.1."), ("attn.qkv.", "attn.qkv."), ("attn.proj.", "attn.proj."))


def mmseg_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MMSegmentation's MAE backbone layout; unknown keys are an error, not dropped.

    The renames of its tools/model_converters/beit2mmseg.py (`_MMSEG_BLOCK_RENAMES`), read with
    mmseg/models/backbones/mae.py, which loads the flat dict with strict=False after resampling a square
    pos_embed. The final `norm` becomes `ln1.*`, the name beit.py gives it with final_norm=True: the MAE config
    (final_norm=False) ignores it, as it ignores the converter's `norm.*`, and final_norm=True uses it.
    """
    return {_mmseg_name(key): value.contiguous() for key, value in state.items()}


def _mmseg_name(key: str) -> str:
    """One timm ViT key's MMSegmentation name (`mmseg_state`)."""
    if key in ("cls_token", "pos_embed"):
        return key
    if key.startswith("patch_embed.proj."):
        return "patch_embed.projection." + key[len("patch_embed.proj."):]
    if key.startswith("norm."):
        return "ln1." + key[len("norm."):]  # the backbone's final norm when final_norm=True
    if key.startswith("blocks.") and key.count(".") >= 2:
        _, index, rest = key.split(".", 2)
        renamed = next((new_p + rest[len(old):] for old, new_p in _MMSEG_BLOCK_RENAMES if rest.startswith(old)), None)
        if renamed is not None:
            return f"layers.{index}.{renamed}"
    raise UserError(f"no MMSegmentation name for {key}")


def _pth_path(out: Path, fmt: str) -> Path:
    return out / f"encoder_{fmt}.pth" if out.is_dir() else out


def _save_pth(obj: Any, path: Path) -> Path:
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def run(source: Union[str, Path], fmt: str, out: Union[str, Path]) -> Path:
    """`droppos export SOURCE --format timm|detectron2|mmseg --out OUT`: the path written.

    SOURCE is read first; then the folder receiving the export is claimed (`files.claim_output`: OUT apart from
    SOURCE, not another command's output, locked), and what is already at OUT is replaced only when it is a
    previous droppos export: a timm folder holding exactly its two files (`is_timm_export`), a .pth holding exactly
    an export layout's keys (`is_export_pth`); anything else is one line, nothing written.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    encoder = read_source(source)
    inputs = [("SOURCE", source), ("SOURCE", encoder.origin)]
    if encoder.origin.suffix == ".safetensors":
        inputs.append(("SOURCE's sidecar", encoder.origin.with_suffix(".json")))
    out = Path(out)
    if fmt == "timm":
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file: the timm format is a folder (config.json + model.safetensors)")
        real = Path(os.path.realpath(out))
        if real.parent == real:
            raise UserError(f"--out {out}: give a folder of its own for the timm files")

        def replaceable() -> None:
            if os.path.lexists(real) and not is_timm_export(real):
                raise UserError(f"--out {out} holds files a droppos timm export did not write (one holds exactly "
                                "config.json and model.safetensors of its layout): refusing to replace them; give a "
                                "new or empty folder")

        with files.claim_output(real.parent, "export", inputs, writes=out, check=replaceable):
            write_timm_folder(encoder, real)
        return out
    _square_grid(encoder, fmt)
    target = _pth_path(out, fmt)
    folder = Path(os.path.realpath(target.parent))

    def replaceable_pth() -> None:
        if os.path.lexists(target) and not is_export_pth(target):
            raise UserError(f"--out {target} exists and is not a droppos export (an export's .pth holds exactly the keys "
                            "of its layout): refusing to replace it; remove it or give another path")

    with files.claim_output(folder, "export", inputs, writes=target, check=replaceable_pth):
        if fmt == "detectron2":
            _save_pth({"model": detectron2_state(encoder.state)}, folder / target.name)
        else:
            _save_pth(mmseg_state(encoder.state), folder / target.name)
    return target


# ---------------------------------------------------------------------------------------------
# What to run next


def downstream_command(fmt: str, path: Union[str, Path], meta: dict[str, Any]) -> str:
    """The command that trains on the export at `path`, with the overrides its architecture needs."""
    args = meta["model_args"]
    img = args["img_size"][0]
    differs = {k: args[k] for k, v in _BASE_ARCH.items() if args[k] != v}
    depth = args["depth"]
    if fmt == "timm":
        return f"python -c \"import timm; m = timm.create_model('local-dir:{path}', pretrained=True)\""
    if fmt == "detectron2":
        net = "model.backbone.net."
        extra = [f"{net}{k}={differs[k]}" for k in _BASE_ARCH if k in differs]
        if img != 224:
            extra.append(f"{net}pretrain_img_size={img}")
        return (f"python tools/lazyconfig_train_net.py --num-gpus 8 --config-file {_DETECTRON2_CONFIG} "
                f"'train.init_checkpoint={path}?matching_heuristics=True'" + "".join(f" {e}" for e in extra)
                + (" (and set lr_factor_func's num_layers in a config copy)" if "depth" in differs else ""))
    if fmt == "mmseg":
        backbone = {"patch_size": "patch_size", "embed_dim": "embed_dims", "depth": "num_layers",
                    "num_heads": "num_heads", "mlp_ratio": "mlp_ratio"}
        extra = [f"model.backbone.{backbone[k]}={int(v) if k == 'mlp_ratio' else v}" for k, v in differs.items()]
        if "depth" in differs:
            outs = [depth // 3 - 1, depth // 2 - 1, 2 * depth // 3 - 1, depth - 1]  # [3, 5, 7, 11] at depth 12
            extra += [f"model.backbone.out_indices=[{','.join(map(str, outs))}]",
                      f"optim_wrapper.paramwise_cfg.num_layers={depth}"]
        if "embed_dim" in differs:
            dim = args["embed_dim"]
            extra += [f"model.neck.embed_dim={dim}", f"model.decode_head.in_channels=[{dim},{dim},{dim},{dim}]",
                      f"model.auxiliary_head.in_channels={dim}"]
        return (f"bash tools/dist_train.sh {_MMSEG_CONFIG} 8 --cfg-options model.pretrained={path}"
                + "".join(f" {e}" for e in extra))
    raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
