"""Encoders for the evaluation stages: a stock timm ViT from our export, a run, a timm name or a checkpoint.

Sources, one result (a timm `VisionTransformer`, ready for `forward`/`forward_features`):

- `encoder=FILE`: `FILE.safetensors` written by `droppos.export.export_encoder`, with `FILE.json` beside it
  naming the timm model and its architecture (`model_args`); the sidecar is untrusted and validated
  (droppos.weights.read_sidecar) before anything is built;
- `run=DIR`: a `droppos pretrain` run directory, i.e. `DIR/encoder.safetensors`;
- `timm_model=NAME`: any registered timm ViT, randomly initialised ("random-init" wherever it is named);
  with `pretrained=True` timm's own pretrained weights for NAME from the Hugging Face hub cache (offline mode
  honoured, one line when they are missing), with `weights=FILE` a local checkpoint in NAME's architecture;
- `weights=FILE` alone: a checkpoint that names its architecture (our export, a pretrain checkpoint).

Foreign layouts (timm, MAE/DeiT, MoCo v3, DINO) are read by droppos.weights; `info["weights"]` says where the
weights came from.

Also here, because finetune and probe (two stages that must not import each other) both need them:
top-1/top-5 counting over an eval loader whose padding is labelled -1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from droppos import UserError

__all__ = ["POOLS", "check_encoder_source", "load_encoder", "encoder_file", "evaluate_topk"]

from droppos.recipes import POOLS  # noqa: E402 - the one list (timm's names: avg of patch tokens, or [CLS])
RANDOM_INIT = "random-init"  # what a model without loaded weights is called, wherever it is named


def encoder_file(encoder: Union[str, Path, None] = None, run: Union[str, Path, None] = None) -> Path:
    """The safetensors file behind `--encoder FILE` or `--run DIR`, checked to exist."""
    if run is not None:
        run = Path(run)
        if not run.is_dir():
            raise UserError(f"--run {run}: no such run directory (give the --out of a `droppos pretrain` run)")
        path = run / "encoder.safetensors"
        if not path.exists():
            hint = (f"run `droppos pretrain --export-only --out {run}` to export it"
                    if (run / "checkpoints" / "last.pt").exists() else "is it a finished `droppos pretrain` run?")
            raise UserError(f"--run {run} has no encoder.safetensors; {hint}")
        return path
    path = Path(encoder)
    if path.is_dir():
        raise UserError(f"--encoder {path} is a directory; give its encoder.safetensors, or use --run {path}")
    if not path.exists():
        raise UserError(f"--encoder {path}: no such file (a pretrain run writes RUN/encoder.safetensors)")
    if path.suffix != ".safetensors":
        raise UserError(f"--encoder {path}: expected a .safetensors file written by `droppos pretrain`")
    return path


def _check_timm_name(timm_model: str, tagged_ok: bool) -> None:
    import timm

    if timm_model.startswith("droppos_"):
        raise UserError(f"--timm-model {timm_model} is a pre-training model; evaluate its run with --run RUN")
    if not timm.is_model(timm_model):
        close = timm.list_models(f"*{timm_model.split('_')[0]}*")[:5]
        raise UserError(f"unknown timm model {timm_model!r}" + (f"; e.g. {', '.join(close)}" if close else ""))
    if "." in timm_model and not tagged_ok:
        arch, tag = timm_model.split(".", 1)
        raise UserError(f"--timm-model {timm_model} names pretrained weights (.{tag}): add --pretrained to load "
                        f"them, or give --timm-model {arch} for a {RANDOM_INIT} model")


def check_encoder_source(
    encoder: Union[str, Path, None] = None,
    run: Union[str, Path, None] = None,
    timm_model: Optional[str] = None,
    weights: Union[str, Path, None] = None,
    pretrained: bool = False,
    random_init: bool = False,
) -> None:
    """The cheap checks of `load_encoder`, for a parent process to fail fast before it launches workers.

    With `pretrained` this also fetches timm's weights into the hub cache (once, here, not in every worker).
    """
    from droppos import weights as foreign

    _check_source(encoder, run, timm_model, weights, pretrained, random_init)
    if pretrained and not random_init:
        foreign.hub_weights_file(timm_model)


def _check_source(encoder: Any, run: Any, timm_model: Optional[str], weights: Any, pretrained: bool,
                  random_init: bool) -> None:
    """Exactly one source, each named file present, timm names known, sidecars valid (nothing downloaded)."""
    from droppos import weights as foreign

    given = [name for name, value in (("--encoder", encoder), ("--run", run), ("--timm-model", timm_model),
                                      ("--weights", weights)) if value]
    sources = [name for name in given if not (name == "--timm-model" and weights)]  # NAME + FILE: one source
    if len(sources) != 1:
        raise UserError("give exactly one of --encoder FILE, --run DIR, --timm-model NAME (optionally with "
                        "--pretrained or --weights FILE) or --weights FILE"
                        + (f" (got {' and '.join(given)})" if given else ""))
    if pretrained and (not timm_model or weights):
        raise UserError("--pretrained loads timm's own weights for --timm-model NAME; it does not combine with "
                        "--weights, --encoder or --run")
    if timm_model:
        _check_timm_name(timm_model, tagged_ok=bool(pretrained or weights or random_init))
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"--weights {path}: " + ("a directory: give the checkpoint file inside it"
                                                      if path.is_dir() else "no such file"))
    elif encoder or run:
        foreign.read_sidecar(encoder_file(encoder, run))


def load_encoder(
    encoder: Union[str, Path, None] = None,
    run: Union[str, Path, None] = None,
    timm_model: Optional[str] = None,
    num_classes: int = 0,
    global_pool: str = "avg",
    drop_path_rate: float = 0.0,
    img_size: Optional[int] = None,
    depth: Optional[int] = None,
    random_init: bool = False,
    weights: Union[str, Path, None] = None,
    pretrained: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """A timm ViT from one source (see the module docstring), and what was loaded.

    `num_classes=0` leaves no head (the model returns pooled features). `img_size` overrides the
    encoder's own resolution (its position embedding is resampled). `depth` applies to a random-init
    `timm_model` only (small experiments). `random_init` builds the architecture of the source without
    loading its weights (the baseline of the same size).
    Returns (model, info) with info keys: source (encoder | run | timm | weights), path, model, model_args,
    img_size (H, W), patch_size, num_features, pretrained, global_pool, label (how to name the model;
    "random-init NAME" without weights) and weights (provenance: source timm-hub | file | droppos-export |
    random-init, path, sha256, layout, dropped_keys, dropped {reason: count}, and timm_name, branch,
    pos_embed_resampled where they apply).
    """
    from droppos import weights as foreign

    _check_source(encoder, run, timm_model, weights, pretrained, random_init)
    if global_pool not in POOLS:
        raise UserError(f"--pool {global_pool!r}: choose avg (mean of patch tokens) or token ([CLS])")
    if num_classes < 0 or not 0 <= drop_path_rate < 1:
        raise UserError("num_classes must be >= 0 and --drop-path in [0, 1)")
    if depth is not None and not (timm_model and not weights and not pretrained):
        raise UserError("--depth only applies with a random-init --timm-model (a file or pretrained weights fix "
                        "the architecture)")
    if img_size is not None and not (type(img_size) is int and 1 <= img_size <= foreign.BOUNDS["img_size"][1]):
        raise UserError(f"--img-size {img_size}: give an integer in 1..{int(foreign.BOUNDS['img_size'][1])}")
    name, model_args, source, path, loaded, origin = _resolve(encoder, run, timm_model, weights, pretrained,
                                                              random_init, depth)
    if img_size is not None:
        model_args["img_size"] = img_size
    kwargs = dict(num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)
    model = _create(name, dict(kwargs, **model_args))
    if not (hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "pos_embed")):
        raise UserError(f"{name} is not a Vision Transformer (no patch_embed/blocks/pos_embed); pick a timm ViT")
    patch = model.patch_embed.patch_size
    img_hw = tuple(int(s) for s in model.patch_embed.img_size)
    if any(s % p for s, p in zip(img_hw, patch)):
        raise UserError(f"image size {img_hw} is not divisible by the patch size {tuple(patch)}: pick a multiple")
    if loaded is not None:
        provenance = loaded.provenance(origin["source"], **origin["extra"], **foreign.load_into(model, loaded, name))
    else:
        provenance = {"source": RANDOM_INIT, "path": None, "sha256": None, "layout": None, "dropped_keys": 0,
                      "dropped": {}}
    info = {
        "source": source,
        "path": str(path) if path is not None else None,
        "model": name,
        "model_args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_args.items()},
        "img_size": img_hw,
        "patch_size": tuple(int(p) for p in patch),
        "num_features": int(model.num_features),
        "pretrained": loaded is not None,
        "global_pool": global_pool,
        "label": _label(name, path, provenance),
        "weights": provenance,
    }
    return model, info


def _resolve(encoder: Any, run: Any, timm_model: Optional[str], weights: Any, pretrained: bool, random_init: bool,
             depth: Optional[int]) -> tuple[str, dict, str, Optional[Path], Any, Optional[dict]]:
    """(architecture name, model_args, info source, path, Weights or None, provenance source and extras)."""
    from droppos import weights as foreign

    if timm_model:
        model_args = {"depth": depth} if depth is not None else {}
        name = timm_model
        if weights:  # the architecture is NAME's: a random-init twin needs nothing from the file
            loaded = None if random_init else foreign.read_weights(weights)
            path = None if random_init else Path(weights)
            return name, model_args, "weights", path, loaded, _origin(loaded, timm_name=timm_model)
        if pretrained and not random_init:
            path, full_name = foreign.hub_weights_file(timm_model)
            loaded = foreign.read_weights(path)
            return name, model_args, "timm", path, loaded, {"source": "timm-hub", "extra": {"timm_name": full_name}}
        return name, model_args, "timm", None, None, None
    if weights:
        loaded = foreign.read_weights(weights)
        if loaded.arch is None:
            hint = foreign.suggest_timm_name(loaded.state)
            raise UserError(f"--weights {weights} ({loaded.layout} layout) does not name its architecture: add "
                            f"--timm-model {hint or 'NAME'}"
                            + (" (its widths; num_heads is not in the weights)" if hint else ""))
        arch = loaded.arch
        return (arch["model"], dict(arch["model_args"]), "weights", Path(weights), None if random_init else loaded,
                _origin(loaded))
    path = encoder_file(encoder, run)
    meta = foreign.read_sidecar(path)
    loaded = None if random_init else foreign.read_weights(path)
    return (meta["model"], dict(meta["model_args"]), "run" if run else "encoder", path, loaded,
            {"source": "droppos-export", "extra": {}})


def _origin(loaded: Any, **extra: Any) -> Optional[dict]:
    if loaded is None:
        return None
    return {"source": "droppos-export" if loaded.layout == "droppos-export" else "file", "extra": extra}


def _label(name: str, path: Optional[Path], provenance: dict) -> str:
    source = provenance["source"]
    if source == RANDOM_INIT:
        return f"{RANDOM_INIT} {name}" + (f" (architecture of {path})" if path is not None else "")
    if source == "timm-hub":
        return f"{provenance['timm_name']} (timm hub weights)"
    if source == "droppos-export":
        return f"droppos encoder {provenance['path']}"
    return f"{Path(provenance['path']).name} ({provenance['layout']} weights in {name})"


def _create(name: str, kwargs: dict) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"cannot build {name} with {sorted(kwargs)}: {first}") from None


# ---------------------------------------------------------------------------------------------
# Shared by finetune and probe


@torch.no_grad()
def evaluate_topk(
    predict: Any,
    batches: Any,
    device: torch.device,
    distributed: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 (percent) and the sample count over eval batches, summed across ranks.

    `predict(images) -> logits`; labels < 0 are the eval loader's padding and are not counted,
    so over all ranks every sample counts exactly once. Counts stay on the device until the end.
    """
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # top-1 hits, top-5 hits, samples
    for images, labels in batches:
        logits = predict(images).float()
        real = labels >= 0
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hits = top == labels[:, None]
        totals[0] += (hits[:, 0] & real).sum()
        totals[1] += (hits.any(-1) & real).sum()
        totals[2] += real.sum()
    if distributed:
        torch.distributed.all_reduce(totals)
    top1, top5, count = totals.tolist()
    if count == 0:
        return {"top1": 0.0, "top5": 0.0, "num_eval_samples": 0}
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "num_eval_samples": int(count)}
