"""Checkpoints made elsewhere, read into a timm ViT: the layouts people download, and untrusted sidecars.

`read_weights(path)` reads one file into timm's `VisionTransformer` key layout and says where it came
from; `load_into(model, weights)` puts it into a model built for it. The layout is recognised from the
file's keys (never from its name):

=================== ====================================================================================
layout              what it looks like
=================== ====================================================================================
timm                a flat ViT state dict (.safetensors, or a .pth/.bin pickle; timm's training
                    checkpoints nest it under 'state_dict')
mae-deit            ``{'model': state_dict}``: MAE pre-training (with its decoder_* and mask_token),
                    MAE fine-tuning (fc_norm + head) and DeiT (head) checkpoints
moco-v3             ``{'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*',
                    'module.predictor.*'}}``: the base encoder is taken, its projector (head.*) dropped
dino                ``{'teacher': ..., 'student': ...}`` with 'backbone.'/'module.' prefixes: the teacher
                    is taken (as DINO evaluates it), its DINOHead (head.*) dropped
droppos-export      our own export: timm keys in .safetensors + a validated JSON sidecar beside it
droppos-checkpoint  a `droppos pretrain` checkpoint (``{'model', 'config', ...}``): the encoder is rebuilt
                    with its fixed sin-cos PE
=================== ====================================================================================

Heads and decoders are dropped and counted by reason, and the position embedding is resampled by timm's own
`checkpoint_filter_fn` (`load_into`). Every file is untrusted input: pickles load with `weights_only=True`
(`_torch_load`), and a sidecar (`encoder.json` beside `encoder.safetensors`) is validated and bounded (`BOUNDS`)
and checked against the safetensors header before timm builds anything (`read_sidecar`): no sidecar value
reaches timm other than as the six architecture numbers. `hub_weights_file` reads `--timm-model NAME
--pretrained` through timm's own Hugging Face cache.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from droppos import UserError
from droppos.files import file_sha256, read_json_input, regular_file
from droppos.distributed import WRAPPER_PREFIXES, strip_prefixes

__all__ = [
    "BOUNDS", "LAYOUTS", "Weights", "architecture_of", "check_img_size", "file_kind", "hub_weights_file", "load_into",
    "load_safetensors",
    "read_droppos_checkpoint", "read_sidecar", "read_weights", "suggest_timm_name",
]

LAYOUTS = ("timm", "mae-deit", "moco-v3", "dino", "droppos-export", "droppos-checkpoint")

# Bounds on every number a sidecar (or a pretrain checkpoint's config) may set. They admit every published
# ViT (ViT-g/14 is 1408 wide, 40 deep; 4096 px at patch 16 is 65536 tokens) and stop a sidecar from making
# timm allocate what the weights file does not hold (img_size 48000 would be 27.6 GB of position embedding).
BOUNDS: dict[str, tuple[float, float]] = {
    "img_size": (1, 4096),  # pixels per side
    "patch_size": (1, 256),
    "tokens": (1, 65536),  # patches per image: (H / patch) * (W / patch)
    "embed_dim": (1, 8192),
    "depth": (1, 256),
    "num_heads": (1, 256),
    "mlp_ratio": (0.0625, 16.0),
    "crop_pct": (0.01, 1.0),
    "in_chans": (1, 16),
    "num_classes": (0, 1_000_000),
    "sidecar_bytes": (0, 1 << 20),
}
_NAME = re.compile(r"^[a-z0-9_]{1,100}$")  # a registered timm architecture: no tag, no hf-hub:/local-dir: source
_WORD = re.compile(r"^[A-Za-z0-9_.]{1,64}$")

# Keys (by prefix) that are never part of the encoder, with the reason they are dropped.
_DROPPED = (
    ("head.", "classifier or projection head (a fresh head is made)"),
    ("pre_logits.", "pre-logits layer"),
    ("decoder_", "MAE decoder"),
    ("mask_token", "MAE mask token"),
    ("pos_decoder_", "DropPos position decoder"),
    ("mask_pos_token", "DropPos [MASK] position token"),
    ("mae_decoder_", "DropPos auxiliary MAE decoder"),
    ("mae_mask_token", "DropPos auxiliary MAE mask token"),
)


# ---------------------------------------------------------------------------------------------
# What was read


@dataclass
class Weights:
    """A checkpoint in timm's ViT key layout (heads and decoders removed), and where it came from."""

    state: dict[str, torch.Tensor]
    layout: str
    path: Path
    sha256: str
    dropped: Counter = field(default_factory=Counter)  # reason -> number of keys
    branch: Optional[str] = None  # DINO: which of teacher / student
    arch: Optional[dict] = None  # {"model", "model_args"} when the file names its architecture (droppos)

    def provenance(self, source: str, **extra: Any) -> dict[str, Any]:
        """info["weights"]: source (timm-hub | file | droppos-export), path, sha256, layout, dropped keys."""
        record: dict[str, Any] = {"source": source, "path": str(self.path), "sha256": self.sha256,
                                  "layout": self.layout, "dropped_keys": sum(self.dropped.values()),
                                  "dropped": dict(sorted(self.dropped.items()))}
        if self.branch:
            record["branch"] = self.branch
        record.update(extra)
        return record


# ---------------------------------------------------------------------------------------------
# Reading files (by content, not by name)


def file_kind(path: Path) -> str:
    """'safetensors', 'torch-zip' or 'torch-pickle' from the first bytes; anything else is refused."""
    size = regular_file(path, "weights file").st_size  # a FIFO or a device is never opened
    try:
        with open(path, "rb") as handle:
            head = handle.read(10)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    # safetensors first: its 8-byte header length may begin with any byte (0x80, 'PK'); then '{"'.
    if len(head) == 10 and head[8:10] == b'{"' and 0 < int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-pickle"
    raise UserError(f"{path} is neither a safetensors file nor a PyTorch checkpoint")


def _torch_load(path: Path, kind: str) -> Any:
    """torch.load with weights_only=True (and mmap for zip files: nothing is read twice).

    Plain containers and tensors only; `argparse.Namespace`, which MAE's and DINO's training checkpoints store,
    is allowed as a plain attribute bag. Anything that needs more is refused.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "torch-zip")
    except pickle.UnpicklingError as err:
        needs = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it needs {needs.group(1)}" if needs else "it holds more than tensors and plain containers"
        raise UserError(f"{path}: refused to unpickle ({what}; only weights are loaded); if you trust the file, "
                        "re-save its state dict: torch.save(torch.load(F, weights_only=False)['model'], 'clean.pth')"
                        ) from None
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise UserError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Layouts


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) \
        and any(isinstance(v, torch.Tensor) for v in obj.values())


def _select(raw: Any, path: Path) -> tuple[dict, str, Optional[str], Counter]:
    """(state, layout, branch, dropped) for the layouts above, from the keys alone."""
    dropped: Counter = Counter()
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a {type(raw).__name__}, not a state dict")
    for branch in ("teacher", "student"):  # DINO: the teacher is what DINO evaluates
        if _is_state_dict(raw.get(branch)):
            return strip_prefixes(raw[branch], WRAPPER_PREFIXES + ("backbone.",)), "dino", branch, dropped
    nested = raw.get("state_dict")
    if _is_state_dict(nested):
        flat = strip_prefixes(nested, WRAPPER_PREFIXES)
        if any(k.startswith("base_encoder.") for k in flat):  # MoCo v3
            state = {k[len("base_encoder."):]: v for k, v in flat.items() if k.startswith("base_encoder.")}
            others = len(flat) - len(state)
            if others:
                dropped["MoCo v3 momentum encoder and predictor"] += others
            return state, "moco-v3", None, dropped
        return flat, "timm", None, dropped
    if _is_state_dict(raw.get("model")):
        flat = strip_prefixes(raw["model"], WRAPPER_PREFIXES)
        if isinstance(raw.get("config"), dict) and "pos_decoder_head.weight" in flat:
            return flat, "droppos-checkpoint", None, dropped
        return flat, "mae-deit", None, dropped
    if _is_state_dict(raw):
        return strip_prefixes(raw, WRAPPER_PREFIXES), "timm", None, dropped
    keys = ", ".join(sorted(map(str, raw))[:6]) or "none"
    raise UserError(f"{path} matches no known checkpoint layout (timm state dict, MAE/DeiT {{'model'}}, MoCo v3 "
                    f"{{'state_dict': module.base_encoder.*}}, DINO {{'teacher'}}, droppos); its top-level keys: {keys}")


def _drop_non_encoder(state: dict, dropped: Counter) -> dict:
    kept = {}
    for key, value in state.items():
        reason = next((why for prefix, why in _DROPPED if key.startswith(prefix)), None)
        if reason is None:
            kept[key] = value
        else:
            dropped[reason] += 1
    return kept


def require_finite(state: dict, path: Union[str, Path]) -> None:
    """Refuse weights holding NaN or inf (a diverged run, a damaged file): every number computed from them would be
    meaningless, so no result is produced from them at all."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{path}: tensor {key} holds non-finite values (NaN or inf); refused")


def _require_encoder(state: dict, path: Path, layout: str) -> None:
    needed = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"{path} ({layout} layout) misses encoder keys: {', '.join(missing)}")


def read_weights(path: Union[str, Path]) -> Weights:
    """One checkpoint file in timm's ViT layout; a .safetensors with a valid sidecar is a droppos export."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--weights {path} is a directory: give the checkpoint file inside it")
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    kind = file_kind(path)
    arch = None
    if kind == "safetensors":
        sidecar = path.with_suffix(".json")
        if sidecar.exists():
            meta = read_sidecar(path)
            arch = {"model": meta["model"], "model_args": meta["model_args"]}
        raw: Any = load_safetensors(path)
    else:
        raw = _torch_load(path, kind)
    state, layout, branch, dropped = _select(raw, path)
    if layout == "droppos-checkpoint":
        model = droppos_model_from(raw, path)
        from droppos.model import encoder_state_dict

        state = encoder_state_dict(model)
        pretext = [k for k in strip_prefixes(raw["model"], WRAPPER_PREFIXES) if k not in state]
        dropped["DropPos position decoder, [MASK] token and auxiliary decoder"] += len(pretext)
        arch = {"model": model.timm_name, "model_args": model.timm_model_args()}
    elif arch is not None:
        layout = "droppos-export"
    state = _drop_non_encoder(state, dropped)
    _require_encoder(state, path, layout)
    require_finite(state, path)
    return Weights(state, layout, path, file_sha256(path), dropped, branch, arch)


# ---------------------------------------------------------------------------------------------
# DropPos pretrain checkpoints


def read_droppos_checkpoint(path: Union[str, Path]) -> nn.Module:
    """The DropPosViT a `droppos pretrain` checkpoint holds (its config checked against its own tensors)."""
    path = Path(path)
    raw = _torch_load(path, file_kind(path))
    if not (isinstance(raw, dict) and _is_state_dict(raw.get("model")) and isinstance(raw.get("config"), dict)):
        raise UserError(f"{path} is not a `droppos pretrain` checkpoint (no 'model' and 'config')")
    return droppos_model_from(raw, path)


# A DropPos model holds an [L, L] grid-distance buffer (and its smoothing map): 4096 patches (a 64 x 64 grid,
# 1024 px at patch 16) is 64 MiB each; the sidecar bound of 65,536 would be 16 GiB.
DROPPOS_MAX_TOKENS = 4096


# Architecture numbers of a pretrain config, with the bound each obeys (checked before anything is built).
_CONFIG_BOUNDS = {"img_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim", "depth": "depth",
                  "num_heads": "num_heads", "decoder_width": "embed_dim", "decoder_depth": "depth",
                  "decoder_heads": "num_heads"}


def droppos_model_from(raw: dict, path: Path) -> nn.Module:
    """Build the model on the meta device first (no memory), compare every shape with the file, then build it."""
    from droppos import checkpoint, recipes
    from droppos.model import create_from_config
    from droppos.recipes import MODELS

    raw = checkpoint.upgrade(raw, path)
    checkpoint.check_digest(raw, path)  # torch.load does not check the zip's CRC: a flipped bit would load
    stage = raw.get("stage")
    if stage != "pretrain":
        raise UserError(f"{path} is a `droppos {stage}` checkpoint: only pre-training checkpoints hold the DropPos model")
    recorded = recipes.option_values(raw["config"])
    for key, bound in _CONFIG_BOUNDS.items():
        if recorded.get(key) is not None:
            _int(recorded[key], key, f"{path}: config", bound)
    if recorded.get("model") not in MODELS:
        raise UserError(f"{path}: config names model {str(recorded.get('model'))[:40]!r}, not one of {', '.join(MODELS)}")
    config = recipes.from_record(recipes.PretrainConfig, raw["config"])
    patch = config.model.patch
    sides = check_img_size(config.model.img_size, patch, f"{path}: config")
    if (sides[0] // patch) * (sides[1] // patch) > DROPPOS_MAX_TOKENS:
        raise UserError(f"{path}: config describes {(sides[0] // patch) * (sides[1] // patch)} patches, above the "
                        f"{DROPPOS_MAX_TOKENS} a DropPos model may have; refused")
    state = strip_prefixes(raw["model"], WRAPPER_PREFIXES)
    require_finite(state, path)
    try:
        with torch.device("meta"):
            shell = create_from_config(config)
        expected = {k: list(v.shape) for k, v in shell.state_dict().items()}
        found = {k: list(v.shape) for k, v in state.items()}
        if expected != found:
            diff = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
            raise UserError(f"{path}: its tensors do not match the model its config describes "
                            f"(e.g. {', '.join(diff[:3])})")
        model = create_from_config(config)
        model.load_state_dict(state)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a foreign config fails in many ways
        first = str(err).splitlines()[0][:160] if str(err) else ""
        raise UserError(f"{path}: cannot rebuild its model: {type(err).__name__}: {first}") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Sidecars (untrusted)


@lru_cache(maxsize=1)
def _timm_vits() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models(module="vision_transformer"))


def _int(value: Any, name: str, where: str, bound: str) -> int:
    low, high = BOUNDS[bound]
    if type(value) is not int or not low <= value <= high:
        raise UserError(f"{where}: {name} must be an integer in {int(low)}..{int(high)}, got {value!r}")
    return value


def _number(value: Any, name: str, where: str, bound: str) -> float:
    low, high = BOUNDS[bound]
    if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
        raise UserError(f"{where}: {name} must be a number in {low}..{high}, got {value!r}")
    return value


def _word(value: Any, name: str, where: str, choices: Optional[tuple] = None) -> str:
    if not isinstance(value, str) or not _WORD.match(value) or (choices and value not in choices):
        allowed = f" (one of {', '.join(choices)})" if choices else ""
        raise UserError(f"{where}: {name} must be a short name{allowed}, got {str(value)[:40]!r}")
    return value


def _bool(value: Any, name: str, where: str) -> bool:
    if type(value) is not bool:
        raise UserError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def _known_keys(obj: Any, known: set, name: str, where: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: {name} must be an object")
    unknown = sorted(str(k) for k in obj if k not in known)
    if unknown:
        raise UserError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:5])} in {name}")
    return obj


def check_img_size(img_size: Any, patch: Optional[int], where: str) -> list[int]:
    """[H, W] from an int or a pair, bounded, divisible by the patch, and at most BOUNDS['tokens'] patches
    (without a patch size, only the sides are checked: the caller bounds the patches of what it builds)."""
    sides = [img_size, img_size] if type(img_size) is int else img_size
    if not isinstance(sides, (list, tuple)) or len(sides) != 2:
        raise UserError(f"{where}: img_size must be an integer or [height, width], got {img_size!r}")
    sides = [_int(s, "img_size", where, "img_size") for s in sides]
    if patch is None:
        return sides
    if any(s % patch for s in sides):
        raise UserError(f"{where}: img_size {sides} is not divisible by the patch size {patch}")
    tokens = (sides[0] // patch) * (sides[1] // patch)
    if tokens > BOUNDS["tokens"][1]:
        raise UserError(f"{where}: img_size {sides} at patch {patch} is {tokens} patches "
                        f"(at most {int(BOUNDS['tokens'][1])})")
    return sides


_MODEL_ARGS = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_chans"}
_PRETRAINED_CFG = {"input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
                   "num_classes", "first_conv", "classifier"}
_DROPPOS_KEYS = {"mask_ratio", "pos_mask_ratio", "mask_token", "attentive", "aux_mae"}
_SIDECAR_KEYS = {"model", "model_args", "pretrained_cfg", "droppos"}


def _check_model_args(args: Any, where: str) -> dict:
    """A sidecar's model_args: the whole architecture, every number bounded."""
    _known_keys(args, _MODEL_ARGS, "model_args", where)
    missing = sorted(key for key in _MODEL_ARGS - {"in_chans"} if args.get(key) is None)
    if missing:
        raise UserError(f"{where}: model_args lacks {', '.join(missing)}")
    return _clean_model_args(args, where, None)


def check_architecture(name: Any, args: Any, where: str) -> tuple[str, dict]:
    """A recorded (timm ViT name, model_args override) pair, e.g. a fine-tuning checkpoint's, validated like a
    sidecar's before anything is built: a known ViT name, known keys only, every number bounded."""
    name = _check_model_name(name, where)
    named = _PATCH_IN_NAME.search(name)  # the named model's patch, unless overridden (timm names all carry it)
    return name, _clean_model_args(args, where, int(named.group(1)) if named else None)


def _clean_model_args(args: Any, where: str, default_patch: Optional[int]) -> dict:
    """The model_args keys given, each bounded: known keys only, heads that divide the width, an img_size
    checked against the patch (`default_patch` where the args name none)."""
    _known_keys(args, _MODEL_ARGS, "model_args", where)
    clean: dict[str, Any] = {}
    for key in ("patch_size", "embed_dim", "depth", "num_heads", "in_chans"):
        if args.get(key) is not None:
            clean[key] = _int(args[key], key, where, key)
    if args.get("mlp_ratio") is not None:
        clean["mlp_ratio"] = _number(args["mlp_ratio"], "mlp_ratio", where, "mlp_ratio")
    if "embed_dim" in clean and "num_heads" in clean and clean["embed_dim"] % clean["num_heads"]:
        raise UserError(f"{where}: embed_dim {clean['embed_dim']} is not divisible by num_heads {clean['num_heads']}")
    if args.get("img_size") is not None:
        clean["img_size"] = check_img_size(args["img_size"], clean.get("patch_size", default_patch), where)
    return clean


_PATCH_IN_NAME = re.compile(r"_patch(\d+)")


def _numbers(value: Any, low: float, high: float) -> bool:
    """A list of 1..16 finite numbers in [low, high] (mean, std)."""
    return isinstance(value, list) and 1 <= len(value) <= 16 and all(
        type(x) in (int, float) and math.isfinite(x) and low <= x <= high for x in value)


def _check_pretrained_cfg(cfg: Any, where: str) -> dict:
    _known_keys(cfg, _PRETRAINED_CFG, "pretrained_cfg", where)
    for key, value in cfg.items():
        if key == "input_size":
            valid = isinstance(value, list) and len(value) == 3
            if valid:
                _int(value[0], "pretrained_cfg.input_size[0]", where, "in_chans")
                for side in value[1:]:
                    _int(side, "pretrained_cfg.input_size", where, "img_size")
        elif key == "fixed_input_size":
            valid = _bool(value, key, where) in (True, False)
        elif key == "interpolation":
            valid = bool(_word(value, key, where, ("bicubic", "bilinear", "nearest")))
        elif key == "crop_mode":
            valid = bool(_word(value, key, where, ("center", "squash", "border")))
        elif key == "crop_pct":
            valid = bool(_number(value, key, where, "crop_pct"))
        elif key in ("mean", "std"):
            valid = _numbers(value, -1e3, 1e3) and (key == "mean" or all(x > 0 for x in value))
        elif key == "num_classes":
            valid = _int(value, key, where, "num_classes") >= 0
        else:  # first_conv, classifier
            valid = bool(_word(value, key, where))
        if not valid:
            raise UserError(f"{where}: pretrained_cfg.{key} has an invalid value {str(value)[:40]!r}")
    return dict(cfg)


def _check_droppos(info: Any, where: str) -> dict:
    from droppos.model import MASK_TOKEN_TYPES

    _known_keys(info, _DROPPOS_KEYS, "droppos", where)
    for key in ("mask_ratio", "pos_mask_ratio"):
        if key in info and not (type(info[key]) in (int, float) and 0 <= info[key] <= 1):
            raise UserError(f"{where}: droppos.{key} must be a number in 0..1, got {info[key]!r}")
    if "mask_token" in info:
        _word(info["mask_token"], "droppos.mask_token", where, MASK_TOKEN_TYPES)
    for key in ("attentive", "aux_mae"):
        if key in info:
            _bool(info[key], f"droppos.{key}", where)
    return dict(info)


def _check_model_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name not in _timm_vits():
        raise UserError(f"{where}: 'model' must name a timm VisionTransformer (e.g. vit_base_patch16_224), "
                        f"got {str(name)[:60]!r}")
    return name


def check_shapes(args: dict, shapes: dict[str, list[int]], where: str) -> None:
    """The architecture in `args` is the one whose tensors the weights file holds (checked on its header)."""
    dim, patch, depth = args["embed_dim"], args["patch_size"], args["depth"]
    height, width = args["img_size"]
    tokens = (height // patch) * (width // patch)
    expected = {
        "cls_token": [1, 1, dim],
        "pos_embed": [1, 1 + tokens, dim],
        "patch_embed.proj.weight": [dim, args.get("in_chans", 3), patch, patch],
        f"blocks.{depth - 1}.mlp.fc1.weight": [int(dim * args["mlp_ratio"]), dim],
    }
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    wrong = [f"{k} {shapes.get(k, 'missing')} (sidecar: {v})" for k, v in expected.items() if shapes.get(k) != v]
    if blocks != set(range(depth)):
        wrong.insert(0, f"{len(blocks)} blocks (sidecar: depth {depth})")
    if wrong:
        raise UserError(f"{where} does not match the weights beside it: {'; '.join(wrong[:2])}")


def read_sidecar(path: Union[str, Path]) -> dict:
    """The validated `<stem>.json` of an exported encoder: {model, model_args, pretrained_cfg?, droppos?}.

    Known keys only, each value typed and bounded, the architecture checked against the safetensors header;
    all before timm builds anything.
    """
    path = Path(path)
    sidecar = path.with_suffix(".json")
    where = str(sidecar)
    if not sidecar.exists():
        raise UserError(f"{path} has no {sidecar.name} beside it (it names the timm model); "
                        "re-export it with `droppos pretrain --export-only --out RUN`")
    meta = read_json_input(sidecar, "sidecar", max_bytes=BOUNDS["sidecar_bytes"][1])
    _known_keys(meta, _SIDECAR_KEYS, "the sidecar", where)
    if "model" not in meta or "model_args" not in meta:
        raise UserError(f"{where} does not name a timm model and its model_args; re-export the encoder")
    clean = {"model": _check_model_name(meta["model"], where), "model_args": _check_model_args(meta["model_args"], where)}
    if "pretrained_cfg" in meta:
        clean["pretrained_cfg"] = _check_pretrained_cfg(meta["pretrained_cfg"], where)
    if "droppos" in meta:
        clean["droppos"] = _check_droppos(meta["droppos"], where)
    check_shapes(clean["model_args"], safetensors_shapes(path), where)
    return clean


# ---------------------------------------------------------------------------------------------
# Architecture of a state dict, and fitting it into a model


def architecture_of(state: dict) -> dict[str, Any]:
    """embed_dim, depth, patch, mlp hidden width and position tokens, read from the tensors."""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    proj = state["patch_embed.proj.weight"]
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    return {
        "embed_dim": int(state["cls_token"].shape[-1]),
        "depth": len(blocks),
        "patch_size": list(proj.shape[-2:]) if proj.ndim == 4 else None,
        "in_chans": int(proj.shape[1]) if proj.ndim == 4 else None,
        "mlp_hidden": int(fc1.shape[0]) if fc1 is not None else None,
        "pos_tokens": int(state["pos_embed"].shape[1]),
    }


def suggest_timm_name(state: dict) -> Optional[str]:
    """The standard timm ViT with these widths (num_heads is not in the weights: it is the size's usual one)."""
    from droppos.recipes import MODELS

    arch = architecture_of(state)
    patch = arch["patch_size"]
    if not patch or patch[0] != patch[1]:
        return None
    for size, (dim, depth, _heads, _patch) in MODELS.items():
        name = f"{size.rsplit('_patch', 1)[0]}_patch{patch[0]}_224"
        if (dim, depth) == (arch["embed_dim"], arch["depth"]) and name in _timm_vits():
            return name
    return None


def _describe(arch: dict) -> str:
    patch = "x".join(map(str, arch["patch_size"] or ["?"]))
    return f"embed {arch['embed_dim']}, depth {arch['depth']}, patch {patch}, mlp {arch['mlp_hidden']}"


def _check_fits(state: dict, model: nn.Module, weights: Weights, name: str) -> None:
    have = architecture_of(state)
    want = architecture_of({k: v for k, v in model.state_dict().items()})
    keys = ("embed_dim", "depth", "patch_size", "in_chans", "mlp_hidden")
    if any(have[k] != want[k] for k in keys):
        hint = suggest_timm_name(state)
        raise UserError(f"{weights.path} holds a ViT with {_describe(have)}; {name} has {_describe(want)}"
                        + (f": try --timm-model {hint}" if hint else ": pick the --timm-model of its architecture"))


def load_into(model: nn.Module, weights: Weights, name: str) -> dict[str, Any]:
    """Load `weights` into the timm ViT `model` (named `name` in messages); returns what was adapted.

    Unknown keys and missing encoder keys are errors (one line); heads, decoders and the final norm the
    model's pooling does not use are dropped and counted; the position embedding is resampled by timm.
    With average pooling timm uses `fc_norm` and no final `norm`: a checkpoint's `fc_norm` is kept (MAE
    fine-tuning), its `norm` dropped (MAE's recipe: fc_norm starts fresh); [CLS] pooling needs the `norm`.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = dict(weights.state)
    dropped = Counter(weights.dropped)
    _check_fits(state, model, weights, name)
    old_tokens = int(state["pos_embed"].shape[1])
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as err:  # noqa: BLE001 - a malformed file fails in many ways
        raise UserError(f"{weights.path} does not fit {name}: {str(err).splitlines()[0][:200]}") from None
    uses_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    if uses_fc_norm:
        if any(k.startswith("norm.") for k in state):
            dropped["final norm (average pooling uses fc_norm)"] += sum(k.startswith("norm.") for k in state)
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    else:
        if any(k.startswith("fc_norm.") for k in state):
            if not any(k.startswith("norm.") for k in state):
                raise UserError(f"{weights.path} has fc_norm but no final norm: it was fine-tuned with average "
                                "pooling; use --pool avg")
            dropped["fc_norm ([CLS] pooling uses the final norm)"] += sum(k.startswith("fc_norm.") for k in state)
            state = {k: v for k, v in state.items() if not k.startswith("fc_norm.")}
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise UserError(f"{weights.path} has keys {name} does not have: {', '.join(unknown[:4])}"
                        + (f" (+{len(unknown) - 4} more)" if len(unknown) > 4 else ""))
    fresh = ("head.",) + (("fc_norm.",) if uses_fc_norm else ())
    missing = sorted(k for k in own if k not in state and not k.startswith(fresh))
    if missing:
        raise UserError(f"{weights.path} ({weights.layout}) misses encoder keys: {', '.join(missing[:4])}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        sizes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line][:2]
        raise UserError(f"{weights.path} does not fit {name}: {'; '.join(sizes) or str(err)[:200]}") from None
    new_tokens = int(model.pos_embed.shape[1])
    adapted: dict[str, Any] = {"dropped_keys": sum(dropped.values()), "dropped": dict(sorted(dropped.items()))}
    if new_tokens != old_tokens:
        adapted["pos_embed_resampled"] = {"from_tokens": old_tokens, "to_grid": list(model.patch_embed.grid_size)}
    return adapted


# ---------------------------------------------------------------------------------------------
# timm's pretrained weights through the hub cache


def hub_weights_file(name: str) -> tuple[Path, str]:
    """(cached file, timm name with its tag) of timm's pretrained weights for `name`.

    Downloads through huggingface_hub as timm does (the repo and file its pretrained_cfg names, library 'timm',
    so into the same cache, and HF_HOME/HF_HUB_CACHE/HF_HUB_OFFLINE behave as for timm); when the file is neither
    cached nor downloadable, one line says how to get it. Not `timm.create_model(NAME, pretrained=True)`: its
    strict load fails for e.g. MAE weights (final `norm`) into a model that pools with `fc_norm`, and it does
    not say which file it read.
    """
    import timm
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        tags = timm.list_pretrained(f"{name.split('.')[0]}.*")[:6]
        raise UserError(f"timm has no pretrained weights named {name!r}"
                        + (f"; e.g. {', '.join(tags)}" if tags else "")) from None
    if cfg is None or not cfg.hf_hub_id:
        raise UserError(f"timm names no Hugging Face hub weights for {name}: pass a local --weights FILE")
    full_name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    offline = constants.is_offline_mode()
    not_local = None
    for filename in files:
        try:
            found = hf_hub_download(repo, filename, revision=revision or None, library_name="timm",
                                    library_version=timm.__version__)
            return Path(found), full_name
        except LocalEntryNotFoundError as err:
            not_local = err
        except EntryNotFoundError:
            continue
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise UserError(f"cannot get timm weights {full_name} from the hub ({repo}): "
                            f"{str(err).splitlines()[0][:160]}") from None
    if not_local is None:
        raise UserError(f"the hub repo {repo} of timm weights {full_name} has none of {', '.join(files)}: "
                        "pass a local --weights FILE")
    why, get = (("HF_HUB_OFFLINE=1 forbids downloading", "run once with network access and HF_HUB_OFFLINE unset")
                if offline else ("they could not be downloaded (no network?)", "run once with network access"))
    raise UserError(f"timm weights {full_name} are not in the Hugging Face cache {constants.HF_HUB_CACHE} and {why}: "
                    f"{get}, or `hf download {repo} {files[0]}` (HF_HOME/HF_HUB_CACHE choose the cache), "
                    "or pass a local --weights FILE")
