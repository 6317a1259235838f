"""Encoders for the evaluation stages: a stock timm ViT built from our export, a run or a timm name.

Three sources, one result (a timm `VisionTransformer`, ready for `forward`/`forward_features`):

- `encoder=FILE`: `FILE.safetensors` written by `droppos.model.export_encoder`, with `FILE.json`
  beside it naming the timm model and its architecture (`model_args`);
- `run=DIR`: a `droppos pretrain` run directory, i.e. `DIR/encoder.safetensors`;
- `timm_model=NAME`: any registered timm ViT, randomly initialised (no download: pretrained=False).

Weights go through timm's own `checkpoint_filter_fn`, so another `img_size` resamples the position
embedding. With global average pooling timm uses `fc_norm` instead of the final `norm`; as in MAE's
fine-tuning, the pre-trained `norm` is then not used and `fc_norm` starts fresh (as does the head).

Also here, because finetune and probe (two stages that must not import each other) both need them:
top-1/top-5 counting over an eval loader whose padding is labelled -1, and atomic JSON writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from droppos import UserError

__all__ = ["POOLS", "check_encoder_source", "load_encoder", "encoder_file", "read_encoder_meta", "evaluate_topk"]

POOLS = ("avg", "token")  # timm's names: average of patch tokens (+ fc_norm), or the [CLS] token
# Keys a classifier may lack in an encoder file: the new head and (with avg pooling) timm's fc_norm.
_FRESH_PREFIXES = ("head.", "fc_norm.")


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


def read_encoder_meta(path: Path) -> dict:
    """`<stem>.json` beside an exported encoder: the timm model name, model_args, pretrained_cfg."""
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.exists():
        raise UserError(f"{path} has no {meta_path.name} beside it (it names the timm model); "
                        "re-export it with `droppos pretrain --export-only --out RUN`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {meta_path}: {err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        raise UserError(f"{meta_path} does not name a timm model (key 'model'); re-export the encoder")
    return meta


def check_encoder_source(
    encoder: Union[str, Path, None] = None, run: Union[str, Path, None] = None, timm_model: Optional[str] = None,
) -> None:
    """The cheap checks of `load_encoder` (one source, file and sidecar exist, timm knows the name),
    for a parent process to fail fast before it launches workers."""
    import timm

    given = [name for name, value in (("--encoder", encoder), ("--run", run), ("--timm-model", timm_model)) if value]
    if len(given) != 1:
        raise UserError("give exactly one of --encoder FILE, --run DIR or --timm-model NAME"
                        + (f" (got {' and '.join(given)})" if given else ""))
    if timm_model:
        if timm_model.startswith("droppos_"):
            raise UserError(f"--timm-model {timm_model} is a pre-training model; evaluate its run with --run RUN")
        if not timm.is_model(timm_model):
            close = timm.list_models(f"*{timm_model.split('_')[0]}*")[:5]
            raise UserError(f"unknown timm model {timm_model!r}" + (f"; e.g. {', '.join(close)}" if close else ""))
        return
    path = encoder_file(encoder, run)
    name = read_encoder_meta(path)["model"]
    if not timm.is_model(name):
        raise UserError(f"{path.with_suffix('.json')} names {name!r}, which this timm does not know")


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
) -> tuple[nn.Module, dict[str, Any]]:
    """A timm ViT from exactly one of `encoder`, `run`, `timm_model`, and what was loaded.

    `num_classes=0` leaves no head (the model returns pooled features). `img_size` overrides the
    encoder's own resolution (its position embedding is resampled). `depth` applies to
    `timm_model` only (small experiments). `random_init` builds the architecture of an encoder
    file without loading its weights (the baseline of the same size).
    Returns (model, info) with info keys: source, path, model, model_args, img_size (H, W),
    patch_size, num_features, pretrained, global_pool.
    """
    import timm

    check_encoder_source(encoder, run, timm_model)
    if global_pool not in POOLS:
        raise UserError(f"--pool {global_pool!r}: choose avg (mean of patch tokens) or token ([CLS])")
    if num_classes < 0 or not 0 <= drop_path_rate < 1:
        raise UserError("num_classes must be >= 0 and --drop-path in [0, 1)")
    kwargs: dict[str, Any] = dict(num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)
    path: Optional[Path] = None
    if timm_model:
        name, model_args, source = timm_model, {}, "timm"
        if depth is not None:
            model_args["depth"] = depth
    else:
        path = encoder_file(encoder, run)
        meta = read_encoder_meta(path)
        name, model_args, source = meta["model"], dict(meta.get("model_args") or {}), "run" if run else "encoder"
        if depth is not None:
            raise UserError("--depth only applies with --timm-model (an encoder file fixes its architecture)")
    if img_size is not None:
        model_args["img_size"] = img_size
    model = _create(timm, name, dict(kwargs, **model_args))
    if not (hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "pos_embed")):
        raise UserError(f"{name} is not a Vision Transformer (no patch_embed/blocks/pos_embed); pick a timm ViT")
    patch = model.patch_embed.patch_size
    img_hw = tuple(int(s) for s in model.patch_embed.img_size)
    if any(s % p for s, p in zip(img_hw, patch)):
        raise UserError(f"image size {img_hw} is not divisible by the patch size {tuple(patch)}: pick a multiple")
    pretrained = path is not None and not random_init
    if pretrained:
        _load_weights(model, path)
    info = {
        "source": source,
        "path": str(path) if path is not None else None,
        "model": name,
        "model_args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_args.items()},
        "img_size": img_hw,
        "patch_size": tuple(int(p) for p in patch),
        "num_features": int(model.num_features),
        "pretrained": pretrained,
        "global_pool": global_pool,
    }
    return model, info


def _create(timm: Any, name: str, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"cannot build {name} with {sorted(kwargs)}: {first}") from None


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load an exported encoder into `model` with timm's filter (pos-embed resampling); strict on the rest."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as err:  # noqa: BLE001 - a malformed or foreign file fails in many ways
        raise UserError(f"{path} does not fit {type(model).__name__}: {str(err).splitlines()[0][:200]}") from None
    if isinstance(model.norm, nn.Identity):  # average pooling: fc_norm replaces norm (fresh, as in MAE)
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        sizes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line][:2]
        raise UserError(f"{path} does not match the model it names: {'; '.join(sizes) or str(err)[:200]}") from None
    missing = [k for k in missing if not k.startswith(_FRESH_PREFIXES)]
    if missing or unexpected:
        what = ", ".join([f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]])
        raise UserError(f"{path} does not match the model it names ({what}); was it exported by `droppos pretrain`?")


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
