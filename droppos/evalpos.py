"""`droppos eval-pos`: how location-aware is a ViT? (METHOD.md, "Location-awareness diagnostics").

Three measurements, each with the settings that produced it, for one model or several side by side:

- Position accuracy (models with the DropPos position head): for each (gamma, gamma_pos), the position
  classifier's top-1 / top-5 over the patches whose PE was dropped, the grid distance (in patches,
  Euclidean on (row, col)) of its wrong answers, a per-cell accuracy map and a histogram of error
  distances. The masks come from a seeded generator, so every model sees the same masks.
- Token-order sensitivity (any timm ViT): the patch tokens are permuted (a) together with their PEs,
  (b) with the PEs left in place (the image is scrambled), (c) with no PE at all. Each is compared with
  the unpermuted input with every PE, by the cosine similarity of the pooled feature ([CLS] or average,
  as the model pools), over several seeded permutations. The prefix tokens ([CLS], registers) keep their
  PE in all three. (a) is exactly 1 for a ViT without order bias; (c) removes all spatial information
  and does not depend on the permutation; a location-aware model has (b) well below (a).
  The cosine is dominated by the direction that every image's feature shares (it is near 1 between two
  different images too), and how dominant that is differs between models. So each variant also gets a
  displacement: the squared distance the feature moves, in units of the mean squared distance between
  the intact features of two different images (0: unchanged; 1: as far as another image): the number
  to compare across models.
  For a classifier head: how often the top-1 class is unchanged, and the accuracy change when the
  data's labels match the head.
- Position linear probe (any timm ViT): frozen backbone; for each image a seeded random fraction of
  the patch PEs is replaced by the mean patch PE (`--probe-fill mean`: carries no position but keeps
  the token statistics the model saw) or by zeros; the final-norm output tokens of those patches,
  standardised with the fitting part's statistics, train a linear softmax classifier over the L cells
  (L-BFGS, small L2). Images alternate between the fitting part (even index) and the test part (odd).

The ViT pieces are run one by one (patch_embed, _pos_embed, norm_pre, blocks, norm, forward_head),
so that tokens are permuted before or after their PE is added; images are never edited.
A DropPos checkpoint's encoder is converted to the stock timm ViT it exports to (same weights, in
memory) for the last two measurements, so every model goes through the same code.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from droppos import UserError, runtime

__all__ = ["DEFAULT_RATIOS", "EvalPosConfig", "Subject", "load_subject", "run"]

REPORT_FORMAT = "droppos-evalpos/1"
DEFAULT_RATIOS: tuple[tuple[float, float], ...] = ((0.75, 0.75), (0.5, 0.75), (0.0, 0.75), (0.0, 1.0))
PROBE_FILLS = ("mean", "zeros")
VARIANTS = {  # report key -> (short label, what is done to the patch tokens)
    "with_pe": ("(a) with PE", "tokens permuted together with their PEs"),
    "pe_in_place": ("(b) PE in place", "tokens permuted, PEs left in place"),
    "no_pe": ("(c) no PE", "tokens permuted, no PEs at all"),
}
IMAGE_CROP_PCT = 0.875  # the eval transform of --images: resize to img/0.875, centre crop (as data.py's eval)


@dataclass
class EvalPosConfig:
    """Every option of `droppos eval-pos` (defaults = the CLI's)."""

    out: str
    sources: list[str] = field(default_factory=list)
    timm_models: list[str] = field(default_factory=list)
    random_baseline: bool = False
    data: Optional[str] = None
    split: str = "val"
    images: Optional[str] = None
    img_size: Optional[int] = None
    batch_size: int = 64
    max_images: int = 0
    ratios: list[tuple[float, float]] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    permutations: int = 5
    probe_drop: float = 0.75
    probe_fill: str = "mean"
    probe_images: int = 1000
    probe_steps: int = 100
    seed: int = 0
    device: str = "auto"
    loader: str = "auto"
    workers: Optional[int] = None


@dataclass
class Subject:
    """One model under test: a timm ViT (always) and the DropPos model with its position head (if any)."""

    name: str
    source: str
    kind: str  # droppos-run | droppos-checkpoint | finetune | encoder | timm | random-init
    vit: nn.Module
    droppos: Optional[nn.Module]
    img_size: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def num_classes(self) -> int:
        return int(getattr(self.vit, "num_classes", 0) or 0)


# ----------------------------------------------------------------------------------------------
# Models


def _droppos_to_timm(core: nn.Module) -> nn.Module:
    """The stock timm ViT that `export_encoder` targets, holding this DropPos encoder's weights."""
    import timm

    from droppos.model import encoder_state_dict

    vit = timm.create_model(core.timm_name, pretrained=False, num_classes=0, **core.timm_model_args())
    vit.load_state_dict(encoder_state_dict(core), strict=True)
    return vit


def _check_vit(vit: nn.Module, what: str) -> None:
    needed = ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "num_prefix_tokens")
    missing = [n for n in needed if not hasattr(vit, n)]
    if missing or not hasattr(vit.patch_embed, "grid_size"):
        raise UserError(f"{what} is not a timm VisionTransformer with patch tokens and absolute PEs "
                        f"(lacks {', '.join(missing) or 'patch_embed.grid_size'}): pick a vit_* / deit_* model")


def _timm_vit(name: str, img_size: Optional[int]) -> nn.Module:
    """A randomly initialised timm model by name (never downloads)."""
    import timm

    import droppos.model  # noqa: F401 - so droppos_* names resolve too

    kwargs = {"img_size": img_size} if img_size else {}
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise UserError(f"unknown timm model {name!r}: see `timm.list_models('vit_*')` for names") from None
        raise
    except TypeError as err:
        raise UserError(f"timm model {name!r} does not take img_size={img_size}: {err}") from None


def _subject_from_droppos(model: nn.Module, name: str, source: str, kind: str, info: dict) -> Subject:
    model.eval()
    vit = _droppos_to_timm(model).eval()
    return Subject(name, source, kind, vit, model, int(model.img_size[0]), info)


def _subject_from_timm(model: nn.Module, name: str, source: str, kind: str, img_size: Optional[int], info: dict) -> Subject:
    from droppos.model import DropPosViT

    if isinstance(model, DropPosViT):
        return _subject_from_droppos(model, name, source, kind, info)
    _check_vit(model, name)
    size = int(model.patch_embed.img_size[0]) if img_size is None else int(img_size)
    return Subject(name, source, kind, model.eval(), None, size, info)


def load_subject(source: str, img_size: Optional[int] = None, timm_name: bool = False) -> Subject:
    """A run directory, a pretrain checkpoint (.pt), an encoder file (.safetensors) or (timm_name) a timm name."""
    if timm_name:
        return _subject_from_timm(_timm_vit(source, img_size), source, source, "timm", img_size, {"timm_model": source})
    path = Path(source)
    if not path.exists():
        raise UserError(f"SOURCE {source} does not exist: give a pretrain run directory, a checkpoint (.pt), "
                        "an encoder (.safetensors) or use --timm-model NAME")
    if path.is_dir():
        checkpoint = path / "checkpoints" / "last.pt"
        if checkpoint.exists():
            return _from_checkpoint(checkpoint, source, path.name, "droppos-run")
        if (path / "encoder.safetensors").exists():
            return _from_encoder(path / "encoder.safetensors", source, path.name, img_size)
        raise UserError(f"{source} holds neither checkpoints/last.pt nor encoder.safetensors: is it a pretrain run?")
    if path.suffix == ".safetensors":
        return _from_encoder(path, source, path.stem, img_size)
    return _from_checkpoint(path, source, path.stem, "droppos-checkpoint")


def _from_checkpoint(path: Path, source: str, name: str, kind: str) -> Subject:
    saved = runtime.load_checkpoint(path)
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict) or "model" not in saved:
        raise UserError(f"{path} is not a droppos checkpoint (no 'model' and 'config'): "
                        "give a pretrain or finetune run directory, its checkpoint, or an encoder .safetensors")
    if "model" not in config:
        return _from_finetune(path, saved, source, name)
    from droppos.model import create_from_config

    model = create_from_config(config)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not match the model its config describes: {str(err).splitlines()[0][:160]}") from None
    info = {"checkpoint": str(path), "step": saved.get("step"), "config": {k: config.get(k) for k in (
        "model", "img_size", "patch_size", "depth", "mask_ratio", "pos_mask_ratio", "mask_token", "epochs")}}
    return _subject_from_droppos(model, name, source, kind, info)


def _from_finetune(path: Path, saved: dict, source: str, name: str) -> Subject:
    """A `droppos finetune` checkpoint: the classifier it trained (architecture from its config, weights from it)."""
    from droppos.encoders import load_encoder

    config, state = saved["config"], saved["model"]
    if "head.weight" not in state or not any(config.get(k) for k in ("encoder", "run", "timm_model")):
        raise UserError(f"{path} is neither a pretrain nor a finetune checkpoint of droppos")
    model, info = load_encoder(config.get("encoder") or None, config.get("run") or None, config.get("timm_model") or None,
                               num_classes=int(state["head.weight"].shape[0]), global_pool=config.get("pool", "avg"),
                               img_size=config.get("img_size"), depth=config.get("depth"), random_init=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not match the classifier its config describes: {str(err).splitlines()[0][:160]}") from None
    info = dict(info, checkpoint=str(path), step=saved.get("step"), pretrained=True)
    return _subject_from_timm(model, name, source, "finetune", None, info)


def _from_encoder(path: Path, source: str, name: str, img_size: Optional[int]) -> Subject:
    from droppos.encoders import load_encoder

    # [CLS] pooling keeps the pre-trained final norm (timm's avg pooling would swap in a fresh fc_norm).
    model, info = load_encoder(encoder=path, num_classes=0, global_pool="token", img_size=img_size)
    return _subject_from_timm(model, name, source, "encoder", img_size, dict(info))


def random_like(subject: Subject, seed: int) -> Subject:
    """The same architecture with fresh random weights (seeded): the control for every number."""
    import copy

    torch.manual_seed(seed)
    if subject.droppos is not None:
        fresh = copy.deepcopy(subject.droppos)
        fresh._init_weights()  # DropPosViT's own (MAE) initialisation
        fresh.eval()
        vit = _droppos_to_timm(fresh).eval()
        droppos_model: Optional[nn.Module] = fresh
    else:
        vit = copy.deepcopy(subject.vit)
        vit.init_weights() if hasattr(vit, "init_weights") else None
        vit.eval()
        droppos_model = None
    return Subject(f"random-init {subject.name}", subject.source, "random-init", vit, droppos_model,
                   subject.img_size, {"random_init_of": subject.name, "seed": seed})


# ----------------------------------------------------------------------------------------------
# Images


@dataclass
class ImageSource:
    """Where images come from, and what happened to them (filled in by the first pass)."""

    data: Optional[str]
    split: str
    images: Optional[str]
    max_images: int
    batch_size: int
    loader: str
    workers: Optional[int]
    has_labels: bool = False
    num_classes: int = 0
    found: int = 0
    used: int = 0
    skipped: list[dict] = field(default_factory=list)

    def batches(self, img_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images [B,3,S,S] normalised on `device`, labels [B] or -1 when unknown); at most max_images."""
        source = self._dataset_batches if self.data else self._folder_batches
        seen = 0
        for images, labels in source(img_size, device):
            if self.max_images:
                images, labels = images[: self.max_images - seen], labels[: self.max_images - seen]
            if len(labels):
                seen += len(labels)
                yield images, labels
            if self.max_images and seen >= self.max_images:
                break
        self.used = seen

    def _dataset_batches(self, img_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from droppos.data import build_loader

        loader = build_loader(self.data, self.split, "eval", self.batch_size, img_size=img_size, backend=self.loader,
                              device=device, seed=0, workers=self.workers)
        self.found, self.has_labels, self.num_classes = loader.num_samples, True, loader.num_classes
        try:
            for images, labels in loader.epoch(0):
                real = labels >= 0
                if bool(real.all()):
                    yield images, labels
                else:
                    yield images[real], labels[real]
        finally:
            loader.close()

    def _folder_batches(self, img_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from timm.data import create_transform

        transform = create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=IMAGE_CROP_PCT)
        files = list_images(Path(self.images))
        self.found = len(files)
        skipped: list[dict] = []
        batch: list[torch.Tensor] = []
        for path in files:
            img, reason = _open_rgb(path)
            if img is None:
                skipped.append({"path": str(path.relative_to(self.images)), "reason": reason})
                continue
            batch.append(transform(img))
            if len(batch) == self.batch_size:
                yield torch.stack(batch).to(device), torch.full((len(batch),), -1, dtype=torch.int64, device=device)
                batch = []
        if batch:
            yield torch.stack(batch).to(device), torch.full((len(batch),), -1, dtype=torch.int64, device=device)
        self.skipped = skipped


def list_images(root: Path) -> list[Path]:
    """Every non-hidden file under `root`, sorted (what is not an image is skipped when opened)."""
    if not root.is_dir():
        raise UserError(f"--images {root} is not a directory: give a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise UserError(f"--images {root} holds no files")
    return files


def _open_rgb(path: Path):
    """(RGB PIL image, None) or (None, why not): orientation applied, 16-bit and float scaled to 8 bits."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                pixels = np.asarray(img, dtype=np.float64)
                span = max(float(pixels.max() - pixels.min()), 1e-12)
                img = Image.fromarray(((pixels - pixels.min()) * (255.0 / span)).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("RGB"), None
    except Exception as err:  # noqa: BLE001 - any decoding failure means: skip and count
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else 'unreadable'}"


# ----------------------------------------------------------------------------------------------
# ViT pieces


def _token_parts(vit: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(patch tokens [B,L,D] without PE, patch PEs [B,L,D], prefix tokens with their PE [B,P,D]).

    `_pos_embed` is affine in the patch tokens, so running it on zeros yields exactly what it adds to
    them and the prefix it prepends, whatever the model's variant (no_embed_class, registers, none).
    """
    x = vit.patch_embed(images)
    with_pe = vit._pos_embed(torch.zeros_like(x))
    if x.ndim == 4:  # dynamic_img_size: NHWC until after the PE
        x = x.flatten(1, 2)
    prefix = vit.num_prefix_tokens
    return x, with_pe[:, prefix:], with_pe[:, :prefix]


def _encode(vit: nn.Module, prefix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Final-norm tokens [B, P+L, D] of prefix + patch tokens (PEs already in them, or not)."""
    x = vit.norm_pre(torch.cat([prefix, patches], dim=1))
    return vit.norm(vit.blocks(x))


def _pooled(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The model's pooled feature (timm's pool + fc_norm); a model without pooling gets the patch mean."""
    pooled = vit.forward_head(tokens, pre_logits=True)
    if pooled.ndim == 3:
        pooled = pooled[:, vit.num_prefix_tokens:].mean(1)
    return pooled


# ----------------------------------------------------------------------------------------------
# Accumulators


class PositionAccuracy:
    """Position top-1/top-5, error distances (exact, by squared distance) and per-cell accuracy at one ratio pair."""

    def __init__(self, mask_ratio: float, pos_mask_ratio: float, grid: tuple[int, int], device: torch.device) -> None:
        from droppos.model import grid_sq_distances, mask_counts

        self.mask_ratio, self.pos_mask_ratio, self.grid = mask_ratio, pos_mask_ratio, grid
        self.num_patches = grid[0] * grid[1]
        self.num_visible, self.num_keep_pe = mask_counts(self.num_patches, mask_ratio, pos_mask_ratio)
        if self.num_visible == self.num_keep_pe:
            raise UserError(f"--ratio {mask_ratio}:{pos_mask_ratio} drops no PE among {self.num_visible} visible "
                            "patches: raise gamma_pos")
        self.sq_dist = grid_sq_distances(grid, device=device).round().long()
        self.top1 = torch.zeros((), dtype=torch.float64, device=device)
        self.top5 = torch.zeros((), dtype=torch.float64, device=device)
        self.cell_count = torch.zeros(self.num_patches, dtype=torch.float64, device=device)
        self.cell_correct = torch.zeros(self.num_patches, dtype=torch.float64, device=device)
        self.sq_counts = torch.zeros(int(self.sq_dist.max()) + 1, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, positions: torch.Tensor, dropped: torch.Tensor) -> None:
        logits, positions = logits[dropped].view(-1, logits.shape[-1]), positions[dropped].view(-1)
        pred = logits.argmax(-1)
        hit = (pred == positions).double()
        k = min(5, logits.shape[-1])
        self.top1 += hit.sum()
        self.top5 += (logits.topk(k, dim=-1).indices == positions[:, None]).any(-1).double().sum()
        self.cell_count += torch.bincount(positions, minlength=self.num_patches).double()
        self.cell_correct += torch.bincount(positions, weights=hit, minlength=self.num_patches)
        self.sq_counts += torch.bincount(self.sq_dist[pred, positions], minlength=len(self.sq_counts)).double()

    def result(self, seed: int) -> dict[str, Any]:
        n = float(self.cell_count.sum())
        counts = self.sq_counts.cpu().numpy()
        dist = np.sqrt(np.arange(len(counts)))
        errors = counts.copy()
        errors[0] = 0.0
        num_errors = float(errors.sum())
        all_dist = np.sqrt(self.sq_dist.double().cpu().numpy())
        off_diag = all_dist[~np.eye(self.num_patches, dtype=bool)]
        max_d = math.ceil(dist[-1]) if len(dist) else 1
        hist, edges = np.histogram(dist[1:], bins=np.arange(0, max_d + 2), weights=errors[1:])
        cell = (self.cell_correct / self.cell_count.clamp_min(1)).cpu().numpy()
        cell[self.cell_count.cpu().numpy() == 0] = np.nan
        return {
            "mask_ratio": self.mask_ratio,
            "pos_mask_ratio": self.pos_mask_ratio,
            "top1": float(self.top1) / n if n else None,
            "top5": float(self.top5) / n if n else None,
            "mean_error": float((errors * dist).sum() / num_errors) if num_errors else 0.0,
            "median_error": _weighted_median(dist, errors) if num_errors else 0.0,
            "mean_distance": float((counts * dist).sum() / n) if n else None,
            "chance_top1": 1.0 / self.num_patches,
            "chance_top5": min(5, self.num_patches) / self.num_patches,
            "chance_mean_error": float(off_diag.mean()) if off_diag.size else 0.0,
            "num_patches": self.num_patches,
            "grid": list(self.grid),
            "visible_per_image": self.num_visible,
            "dropped_per_image": self.num_visible - self.num_keep_pe,
            "patches_evaluated": int(n),
            "errors": int(num_errors),
            "error_histogram": {"bin_edges": edges.tolist(), "counts": [int(c) for c in hist]},
            "cell_accuracy": [[None if np.isnan(v) else float(v) for v in row] for row in cell.reshape(self.grid)],
            "seed": seed,
            "distance": "Euclidean on the (row, col) patch grid, in patches; *_error over wrong top-1 answers",
        }


def _weighted_median(values: np.ndarray, counts: np.ndarray) -> float:
    """Median of a multiset given as (sorted values, integer counts); the mean of the two middles for an even size."""
    cum = np.cumsum(counts)
    total = int(round(cum[-1]))

    def kth(k: int) -> float:  # the k-th smallest, 1-indexed
        return float(values[np.searchsorted(cum, k - 0.5, side="left")])

    if total % 2:
        return kth((total + 1) // 2)
    return (kth(total // 2) + kth(total // 2 + 1)) / 2


class OrderSensitivity:
    """Cosine of pooled features (and classifier agreement) between the intact input and (a), (b), (c)."""

    def __init__(self, permutations: torch.Tensor, classifier: bool, labelled: bool) -> None:
        self.permutations = permutations  # [P, L]
        self.classifier, self.labelled = classifier, labelled
        self.cos: dict[str, list[list[torch.Tensor]]] = {k: [[] for _ in permutations] for k in VARIANTS}
        self.shift: dict[str, list[list[torch.Tensor]]] = {k: [[] for _ in permutations] for k in VARIANTS}
        # Running sums of the intact features: their spread across images is the displacement's unit.
        self.ref_sum: Optional[torch.Tensor] = None  # [D]
        self.ref_sq_sum: Optional[torch.Tensor] = None  # scalar; tensors, so no host sync per batch
        self.count = 0
        self.agree: dict[str, list[torch.Tensor]] = {k: [] for k in VARIANTS}
        self.correct: dict[str, list[torch.Tensor]] = {k: [] for k in ("reference", *VARIANTS)}

    def update(self, vit: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        x, pe, prefix = _token_parts(vit, images)
        reference = _encode(vit, prefix, x + pe)
        ref_feat = _pooled(vit, reference).double()
        if self.ref_sum is None:
            self.ref_sum, self.ref_sq_sum = ref_feat.sum(0), ref_feat.square().sum()
        else:
            self.ref_sum, self.ref_sq_sum = self.ref_sum + ref_feat.sum(0), self.ref_sq_sum + ref_feat.square().sum()
        self.count += ref_feat.shape[0]
        ref_pred = vit.forward_head(reference).argmax(-1) if self.classifier else None
        if ref_pred is not None and self.labelled:
            self.correct["reference"].append((ref_pred == labels).float())
        for p, perm in enumerate(self.permutations):
            inputs = {"with_pe": (x + pe)[:, perm], "pe_in_place": x[:, perm] + pe, "no_pe": x[:, perm]}
            for key, patches in inputs.items():
                tokens = _encode(vit, prefix, patches)
                feat = _pooled(vit, tokens).double()
                self.cos[key][p].append(F.cosine_similarity(feat, ref_feat, dim=-1))
                self.shift[key][p].append((feat - ref_feat).square().sum(-1))
                if ref_pred is not None:
                    pred = vit.forward_head(tokens).argmax(-1)
                    self.agree[key].append((pred == ref_pred).float())
                    if self.labelled:
                        self.correct[key].append((pred == labels).float())

    def pair_distance(self) -> float:
        """Mean squared distance between the intact features of two different images (i != j)."""
        n = self.count
        mean = self.ref_sum / n
        variance = float(self.ref_sq_sum) / n - float(mean.square().sum())  # total variance, population
        return max(0.0, variance) * 2 * n / (n - 1) if n > 1 else 0.0

    def result(self, pool: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        unit = self.pair_distance()
        for key, (label, what) in VARIANTS.items():
            per_perm = [torch.cat(c) for c in self.cos[key]]
            everything = torch.cat(per_perm)
            entry: dict[str, Any] = {
                "cosine_mean": float(everything.mean()),
                "cosine_std": float(everything.std(unbiased=False)),
                "cosine_per_permutation": [float(c.mean()) for c in per_perm],
                "label": label,
                "what": what,
            }
            if unit > 0:
                shifts = [torch.cat(d) / unit for d in self.shift[key]]
                every_shift = torch.cat(shifts)
                entry.update(displacement_mean=float(every_shift.mean()),
                             displacement_std=float(every_shift.std(unbiased=False)),
                             displacement_per_permutation=[float(d.mean()) for d in shifts])
            else:  # every image gives the same feature: no scale to measure a change against
                entry.update(displacement_mean=None, displacement_std=None, displacement_per_permutation=None)
            if self.agree[key]:
                entry["top1_agreement"] = float(torch.cat(self.agree[key]).mean())
            if self.labelled and self.correct[key]:
                acc = float(torch.cat(self.correct[key]).mean())
                ref = float(torch.cat(self.correct["reference"]).mean())
                entry.update(accuracy=acc, accuracy_change=acc - ref)
            out[key] = entry
        if self.labelled and self.correct["reference"]:
            out["reference_accuracy"] = float(torch.cat(self.correct["reference"]).mean())
        out["settings"] = {
            "permutations": len(self.permutations),
            "feature": pool,
            "compared_with": "the same images, unpermuted, with every PE",
            "cosine_std": "over all (image, permutation) pairs",
            "displacement": "squared distance the feature moves, over the mean squared distance between the intact "
                            "features of two different images (0: unchanged, 1: as far as another image); unlike "
                            "the cosine it ignores the direction every image's feature shares",
            "prefix_tokens": "keep their PE in every variant",
        }
        return out


class ProbeFeatures:
    """Output tokens of PE-dropped patches and their true cells, split into fitting / test parts."""

    def __init__(self, num_patches: int, drop: float, fill: str, max_images: int, generator: torch.Generator) -> None:
        self.num_patches, self.fill, self.max_images, self.generator = num_patches, fill, max_images, generator
        self.num_drop = math.floor(num_patches * drop + 1e-9)
        if self.num_drop < 1:
            raise UserError(f"--probe-drop {drop} drops no PE of {num_patches} patches: raise it")
        self.parts: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {"fit": ([], []), "test": ([], [])}
        self.images_seen = 0

    def update(self, vit: nn.Module, images: torch.Tensor) -> None:
        if self.max_images and self.images_seen >= self.max_images:
            return
        if self.max_images:
            images = images[: self.max_images - self.images_seen]
        batch = images.shape[0]
        noise = torch.rand(batch, self.num_patches, generator=self.generator, device=self.generator.device)
        dropped = torch.argsort(noise, dim=1)[:, : self.num_drop].to(images.device)  # [B, n] cells
        x, pe, prefix = _token_parts(vit, images)
        fill = pe.mean(dim=1, keepdim=True) if self.fill == "mean" else torch.zeros_like(pe[:, :1])
        mask = torch.zeros(batch, self.num_patches, 1, dtype=torch.bool, device=images.device)
        mask.scatter_(1, dropped.unsqueeze(-1), True)
        tokens = _encode(vit, prefix, x + torch.where(mask, fill.expand_as(pe), pe))[:, vit.num_prefix_tokens:]
        feats = torch.gather(tokens, 1, dropped.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        index = torch.arange(self.images_seen, self.images_seen + batch, device=images.device)
        for name, keep in (("fit", index % 2 == 0), ("test", index % 2 == 1)):
            self.parts[name][0].append(feats[keep].flatten(0, 1).float())
            self.parts[name][1].append(dropped[keep].flatten())
        self.images_seen += batch

    def result(self, grid: tuple[int, int], steps: int, seed: int) -> dict[str, Any]:
        from droppos.model import grid_sq_distances

        fit_x, fit_y = (torch.cat(t) if t else None for t in self.parts["fit"])
        test_x, test_y = (torch.cat(t) if t else None for t in self.parts["test"])
        settings = {
            "drop_ratio": self.num_drop / self.num_patches, "dropped_per_image": self.num_drop,
            "fill": "mean patch PE" if self.fill == "mean" else "zeros",
            "split": "images alternate: even index fits the probe, odd index tests it",
            "classifier": "linear softmax over the L cells on standardised final-norm tokens; L-BFGS, L2 1e-4",
            "steps": steps, "seed": seed, "images": self.images_seen,
        }
        if fit_x is None or test_x is None or len(fit_x) == 0 or len(test_x) == 0:
            return {"top1": None, "note": "needs at least 2 images", **settings}
        mean, std = fit_x.mean(0), fit_x.std(0).clamp_min(1e-6)
        fit_x, test_x = (fit_x - mean) / std, (test_x - mean) / std
        torch.manual_seed(seed)
        with torch.enable_grad(), torch.inference_mode(False):
            fit_x, fit_y = fit_x.clone(), fit_y.clone()
            head = nn.Linear(fit_x.shape[1], self.num_patches).to(fit_x.device)
            optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                          line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = F.cross_entropy(head(fit_x), fit_y) + 1e-4 * head.weight.square().sum()
                loss.backward()
                return loss

            optimizer.step(closure)
            with torch.no_grad():
                fit_top1 = float((head(fit_x).argmax(-1) == fit_y).float().mean())
                logits = head(test_x.clone())
        pred = logits.argmax(-1)
        sq = grid_sq_distances(grid, device=logits.device)
        wrong = pred != test_y
        dist = sq[pred[wrong], test_y[wrong]].sqrt()
        return {
            "top1": float((~wrong).float().mean()),
            "top5": float((logits.topk(min(5, self.num_patches), -1).indices == test_y[:, None]).any(-1).float().mean()),
            "mean_error": float(dist.mean()) if len(dist) else 0.0,
            "fit_top1": fit_top1,
            "chance_top1": 1.0 / self.num_patches,
            "fit_tokens": int(len(fit_y)),
            "test_tokens": int(len(test_y)),
            **settings,
        }


# ----------------------------------------------------------------------------------------------
# Evaluation of one model


def evaluate(subject: Subject, images: ImageSource, config: EvalPosConfig, device: torch.device) -> dict[str, Any]:
    """Every measurement for one model in one pass over the images."""
    subject.vit.to(device)
    if subject.droppos is not None:
        subject.droppos.to(device)
    rows, cols = subject.grid
    num_patches = rows * cols
    seeds = torch.Generator().manual_seed(config.seed)
    permutations = torch.stack([torch.randperm(num_patches, generator=seeds) for _ in range(config.permutations)]).to(device)
    ratio_gens = [torch.Generator(device=device).manual_seed(config.seed + 1000 + i) for i in range(len(config.ratios))]
    accuracies = []
    if subject.droppos is not None:
        accuracies = [PositionAccuracy(g, gp, subject.grid, device) for g, gp in config.ratios]
    order = OrderSensitivity(permutations, classifier=subject.num_classes > 0,
                             labelled=images.data is not None and subject.num_classes > 0)
    probe = ProbeFeatures(num_patches, config.probe_drop, config.probe_fill, config.probe_images,
                          torch.Generator(device=device).manual_seed(config.seed + 2000))
    started = time.perf_counter()
    batches = seen = 0
    with torch.inference_mode():
        for imgs, labels in images.batches(subject.img_size, device):
            if order.labelled and images.num_classes != subject.num_classes:
                order.labelled = False  # the head's classes are not the data's: agreement only
            torch.manual_seed(config.seed + batches)  # the 'wrong' mask token draws from the global generator
            for acc, gen in zip(accuracies, ratio_gens):
                noise = torch.rand(imgs.shape[0], num_patches, generator=gen, device=device)
                out = subject.droppos.forward_position(imgs, acc.mask_ratio, acc.pos_mask_ratio, noise=noise)
                acc.update(out["logits"], out["positions"], out["dropped"])
            order.update(subject.vit, imgs, labels)
            probe.update(subject.vit, imgs)
            batches += 1
            seen += imgs.shape[0]
            if batches % 10 == 0:
                print(f"eval-pos {subject.name}: {batches} batches, {seen} images",
                      file=sys.stderr, flush=True)
    if batches == 0:
        raise UserError("no image could be read: nothing to evaluate (see skipped.jsonl in --out)")
    cls_pool = getattr(subject.vit, "global_pool", "token")
    pool = "[CLS] token" if cls_pool == "token" else f"{cls_pool or 'avg'} pooling of patch tokens"
    result = {
        "name": subject.name,
        "source": subject.source,
        "kind": subject.kind,
        "architecture": {
            "timm_model": getattr(subject.vit, "default_cfg", {}).get("architecture") if hasattr(subject.vit, "default_cfg") else None,
            "img_size": subject.img_size, "grid": [rows, cols], "num_patches": num_patches,
            "embed_dim": int(subject.vit.embed_dim), "depth": len(subject.vit.blocks),
            "position_head": subject.droppos is not None, "num_classes": subject.num_classes,
        },
        "info": subject.info,
        "images": images.used,
        "position_accuracy": [a.result(config.seed + 1000 + i) for i, a in enumerate(accuracies)],
        "order_sensitivity": order.result(pool),
        "position_probe": probe.result(subject.grid, config.probe_steps, config.seed + 2000),
        "seconds": round(time.perf_counter() - started, 3),
    }
    subject.vit.to("cpu")
    if subject.droppos is not None:
        subject.droppos.to("cpu")
    return result


# ----------------------------------------------------------------------------------------------
# Report


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def make_plots(results: list[dict]) -> dict[str, bytes]:
    """PNG bytes by file name: accuracy bars, heatmaps, error histograms, order sensitivity, probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    names = [r["name"] for r in results]
    width = 0.8 / max(1, len(results))
    with_pos = [r for r in results if r["position_accuracy"]]
    if with_pos:
        labels = [f"γ={a['mask_ratio']:g}\nγpos={a['pos_mask_ratio']:g}" for a in with_pos[0]["position_accuracy"]]
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(labels), 3.6))
        for i, r in enumerate(with_pos):
            xs = np.arange(len(r["position_accuracy"])) + i * width
            ax.bar(xs, [100 * (a["top1"] or 0) for a in r["position_accuracy"]], width, label=r["name"])
        ax.axhline(100 * with_pos[0]["position_accuracy"][0]["chance_top1"], color="k", ls="--", lw=1, label="chance")
        ax.set_xticks(np.arange(len(labels)) + width * (len(with_pos) - 1) / 2, labels)
        ax.set_ylabel("position top-1 on dropped patches (%)")
        ax.legend(fontsize=8)
        plots["position_accuracy.png"] = _png(fig)
        for index, r in enumerate(results):
            if not r["position_accuracy"]:
                continue
            entries = r["position_accuracy"]
            fig, axes = plt.subplots(1, len(entries), figsize=(3.2 * len(entries), 3.2), squeeze=False)
            for ax, a in zip(axes[0], entries):
                cell = np.array([[np.nan if v is None else v for v in row] for row in a["cell_accuracy"]], dtype=float)
                image = ax.imshow(100 * cell, vmin=0, vmax=100, cmap="viridis")
                ax.set_title(f"γ={a['mask_ratio']:g} γpos={a['pos_mask_ratio']:g}\ntop-1 {100 * (a['top1'] or 0):.1f}%", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
            fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy per cell (%)")
            fig.suptitle(r["name"], fontsize=10)
            plots[f"heatmap_{index}.png"] = _png(fig)
            fig, ax = plt.subplots(figsize=(5.5, 3.4))
            for a in entries:
                hist = a["error_histogram"]
                counts = np.array(hist["counts"], dtype=float)
                share = counts / max(1.0, a["patches_evaluated"])
                ax.step(hist["bin_edges"][:-1], 100 * share, where="post", label=f"γ={a['mask_ratio']:g} γpos={a['pos_mask_ratio']:g}")
            ax.set_xlabel("error distance (patches, bins of 1)")
            ax.set_ylabel("share of dropped patches (%)")
            ax.set_title(r["name"], fontsize=10)
            ax.legend(fontsize=8)
            plots[f"error_histogram_{index}.png"] = _png(fig)
    fig, (ax, ax_shift) = plt.subplots(1, 2, figsize=(12, 3.6))
    for i, r in enumerate(results):
        o = r["order_sensitivity"]
        xs = np.arange(len(VARIANTS)) + i * width
        ax.bar(xs, [o[k]["cosine_mean"] for k in VARIANTS], width, yerr=[o[k]["cosine_std"] for k in VARIANTS],
               label=r["name"], capsize=3)
        shifts = [o[k]["displacement_mean"] for k in VARIANTS]
        bars = ax_shift.bar(xs, [d or 0 for d in shifts], width, label=r["name"])
        ax_shift.bar_label(bars, ["–" if d is None else f"{d:.3f}" for d in shifts], fontsize=7)
    for axis in (ax, ax_shift):
        axis.set_xticks(np.arange(len(VARIANTS)) + width * (len(results) - 1) / 2, [v[0] for v in VARIANTS.values()])
        axis.legend(fontsize=8)
    ax.set_ylabel("cosine(pooled feature, intact)")
    ax.set_ylim(min(0.0, min(r["order_sensitivity"][k]["cosine_mean"] for r in results for k in VARIANTS)), 1.05)
    ax.set_title("token-order sensitivity: cosine to the intact feature", fontsize=10)
    ax_shift.set_ylabel("displacement (1 = as far as another image)")
    ax_shift.set_title("token-order sensitivity: displacement ((b): higher = more order-aware)", fontsize=10)
    plots["order_sensitivity.png"] = _png(fig)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(results), 3.4))
    ax.bar(np.arange(len(results)), [100 * (r["position_probe"].get("top1") or 0) for r in results], 0.6)
    ax.axhline(100 * results[0]["position_probe"].get("chance_top1", 0), color="k", ls="--", lw=1, label="chance")
    ax.set_xticks(np.arange(len(results)), names, rotation=15, fontsize=8)
    ax.set_ylabel("position linear probe top-1 (%)")
    ax.legend(fontsize=8)
    plots["position_probe.png"] = _png(fig)
    return plots


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "–"
    if percent:
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _pm(entry: dict, name: str) -> str:
    mean, std = entry.get(f"{name}_mean"), entry.get(f"{name}_std")
    return "–" if mean is None else f"{mean:.4f} ± {std:.4f}"


def summary_rows(results: list[dict]) -> list[tuple[str, list[str]]]:
    """(metric, one cell per model): the terminal table and the HTML summary table."""
    rows: list[tuple[str, list[str]]] = [("kind", [r["kind"] for r in results]),
                                         ("images", [str(r["images"]) for r in results]),
                                         ("grid", ["x".join(map(str, r["architecture"]["grid"])) for r in results])]
    ratios = [(a["mask_ratio"], a["pos_mask_ratio"]) for r in results for a in r["position_accuracy"]]
    for g, gp in dict.fromkeys(ratios):
        def pick(r: dict, key: str, percent: bool) -> str:
            hit = [a for a in r["position_accuracy"] if (a["mask_ratio"], a["pos_mask_ratio"]) == (g, gp)]
            return _fmt(hit[0][key], percent) if hit else "–"
        rows.append((f"pos top-1 γ={g:g} γpos={gp:g}", [pick(r, "top1", True) for r in results]))
        rows.append((f"pos top-5 γ={g:g} γpos={gp:g}", [pick(r, "top5", True) for r in results]))
        rows.append((f"mean / median error γ={g:g} γpos={gp:g}",
                     [f"{pick(r, 'mean_error', False)} / {pick(r, 'median_error', False)}" for r in results]))
    for key, (label, _) in VARIANTS.items():
        rows.append((f"cosine {label}", [f"{r['order_sensitivity'][key]['cosine_mean']:.4f} ± "
                                         f"{r['order_sensitivity'][key]['cosine_std']:.4f}" for r in results]))
        rows.append((f"displacement {label}", [_pm(r["order_sensitivity"][key], "displacement") for r in results]))
        if any("top1_agreement" in r["order_sensitivity"][key] for r in results):
            rows.append((f"top-1 agreement {label}", [_fmt(r["order_sensitivity"][key].get("top1_agreement"), True) for r in results]))
        if any("accuracy_change" in r["order_sensitivity"][key] for r in results):
            rows.append((f"accuracy change {label}", [_fmt(r["order_sensitivity"][key].get("accuracy_change"), True) for r in results]))
    rows.append(("position probe top-1", [_fmt(r["position_probe"].get("top1"), True) for r in results]))
    rows.append(("position probe chance", [_fmt(r["position_probe"].get("chance_top1"), True) for r in results]))
    return rows


def write_html(path: Path, report: dict, plots: dict[str, bytes]) -> None:
    """One self-contained page: summary table, per-setting tables, every plot inline (base64 PNG)."""
    results = report["models"]
    esc = html.escape
    head = "".join(f"<th>{esc(r['name'])}</th>" for r in results)
    body = "".join(f"<tr><td>{esc(m)}</td>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
                   for m, cells in summary_rows(results))
    detail = []
    for r in results:
        if r["position_accuracy"]:
            rows = "".join(
                f"<tr><td>{a['mask_ratio']:g}</td><td>{a['pos_mask_ratio']:g}</td><td>{_fmt(a['top1'], True)}</td>"
                f"<td>{_fmt(a['top5'], True)}</td><td>{a['mean_error']:.3f}</td><td>{a['median_error']:.3f}</td>"
                f"<td>{_fmt(a['chance_top1'], True)}</td><td>{a['chance_mean_error']:.3f}</td>"
                f"<td>{a['dropped_per_image']} / {a['visible_per_image']}</td><td>{a['patches_evaluated']}</td></tr>"
                for a in r["position_accuracy"])
            detail.append(
                f"<h3>{esc(r['name'])}: position accuracy</h3><table><tr><th>γ</th><th>γpos</th><th>top-1</th>"
                "<th>top-5</th><th>mean error</th><th>median error</th><th>chance top-1</th><th>chance mean error</th>"
                f"<th>dropped / visible per image</th><th>patches</th></tr>{rows}</table>")
    images = "".join(
        f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
        f"<figcaption>{esc(name)}</figcaption></figure>" for name, data in plots.items())
    settings = esc(json.dumps(report["settings"], indent=2))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>droppos eval-pos</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
td:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; }}
img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 1em; }}
</style></head><body>
<h1>Location awareness: droppos eval-pos</h1>
<p>Images: {esc(str(report['data'].get('description')))}; {report['data'].get('used')} used,
{len(report['data'].get('skipped', []))} skipped. See METHOD.md, "Location-awareness diagnostics".</p>
<h2>Summary</h2><table><tr><th>metric</th>{head}</tr>{body}</table>
{''.join(detail)}
<h2>Plots</h2>{images}
<h2>Settings</h2><pre>{settings}</pre>
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="droppos eval-pos")
    table.add_column("metric")
    for r in results:
        table.add_column(r["name"], justify="right")
    for metric, cells in summary_rows(results):
        table.add_row(metric, *cells)
    Console().print(table)


# ----------------------------------------------------------------------------------------------
# Entry point


def _validate(config: EvalPosConfig) -> None:
    if not config.out:
        raise UserError("--out is required: the folder the report is written to")
    if not config.sources and not config.timm_models:
        raise UserError("give a SOURCE (pretrain run, checkpoint or encoder .safetensors) or --timm-model NAME")
    if (config.data is None) == (config.images is None):
        raise UserError("give exactly one of --data DIR (shards) and --images DIR (a folder of images)")
    if config.data is not None and not Path(config.data).is_dir():
        raise UserError(f"--data {config.data} is not a directory: give a dataset written by `droppos shard`")
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise UserError(f"--out {config.out} is a file: give a directory")
    checks = [
        (config.batch_size >= 1, "--batch-size must be >= 1"),
        (config.permutations >= 1, "--permutations must be >= 1"),
        (0.0 < config.probe_drop <= 1.0, "--probe-drop must be in (0, 1]"),
        (config.probe_fill in PROBE_FILLS, f"--probe-fill: choose {' or '.join(PROBE_FILLS)}"),
        (config.probe_steps >= 1, "--probe-steps must be >= 1"),
        (config.max_images >= 0 and config.probe_images >= 0, "--max-images and --probe-images must be >= 0"),
        (config.loader in ("auto", "dali", "pil"), "--loader: choose auto, dali or pil"),
        (bool(config.ratios), "give at least one --ratio"),
    ]
    runtime.check_all(checks)
    for g, gp in config.ratios:
        if not (0.0 <= g < 1.0 and 0.0 < gp <= 1.0):
            raise UserError(f"--ratio {g}:{gp}: gamma must be in [0, 1) and gamma_pos in (0, 1]")
    if config.images is not None:
        list_images(Path(config.images))
    else:
        from droppos.manifest import load_manifest, split_shards

        split_shards(Path(config.data), config.split, load_manifest(Path(config.data)))


def parse_ratio(text: str) -> tuple[float, float]:
    """'0.75:0.75' -> (0.75, 0.75) (gamma : gamma_pos)."""
    try:
        g, gp = (float(v) for v in text.replace(",", ":").split(":"))
    except ValueError:
        raise UserError(f"--ratio {text!r}: expected GAMMA:GAMMA_POS, e.g. 0.75:0.75") from None
    return g, gp


def _unique_names(subjects: Sequence[Subject]) -> None:
    seen: dict[str, int] = {}
    for s in subjects:
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name} ({seen[s.name]})"
        else:
            seen[s.name] = 1


def run(config: EvalPosConfig) -> Path:
    """Load every model, evaluate each on the same images, write report.json / .html / PNGs; returns report.html."""
    _validate(config)
    device = torch.device(runtime.resolve_device(config.device, 0))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # cosines near 1 must mean what they say
    subjects = [load_subject(s, config.img_size) for s in config.sources]
    subjects += [load_subject(name, config.img_size, timm_name=True) for name in config.timm_models]
    if config.random_baseline:
        subjects.append(random_like(subjects[0], config.seed))
    _unique_names(subjects)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    images = ImageSource(config.data, config.split, config.images, config.max_images, config.batch_size,
                         config.loader, config.workers)
    results = []
    for subject in subjects:
        print(f"eval-pos: {subject.name} ({subject.kind}, {subject.img_size}px, grid "
              f"{subject.grid[0]}x{subject.grid[1]}) on {device}", file=sys.stderr, flush=True)
        results.append(evaluate(subject, images, config, device))
    description = (f"split {config.split!r} of {config.data}" if config.data else f"folder {config.images}")
    report = {
        "format": REPORT_FORMAT,
        "position_accuracy": results[0]["position_accuracy"],
        "order_sensitivity": results[0]["order_sensitivity"],
        "position_probe": results[0]["position_probe"],
        "models": results,
        "data": {"description": description, "found": images.found, "used": images.used, "skipped": images.skipped},
        "settings": dict(dataclasses.asdict(config), device=str(device), precision="fp32 (TF32 off)",
                         primary="top-level position_accuracy / order_sensitivity / position_probe are models[0]'s"),
    }
    report["settings"]["ratios"] = [list(r) for r in config.ratios]
    if images.skipped:
        (out / "skipped.jsonl").write_text("".join(json.dumps(s) + "\n" for s in images.skipped))
    plots = make_plots(results)
    for name, data in plots.items():
        (out / name).write_bytes(data)
    report["plots"] = sorted(plots)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    page = out / "report.html"
    write_html(page, report, plots)
    print_table(results)
    if images.skipped:
        print(f"skipped {len(images.skipped)} unreadable file(s): {out / 'skipped.jsonl'}", file=sys.stderr)
    print(f"report: {page}")
    return page
