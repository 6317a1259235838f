"""What eval-pos measures: the ViT taken apart, and one accumulator per measurement.

The ViT pieces are run one by one (patch_embed, timm's private _pos_embed through `droppos.fastpaths`,
norm_pre, blocks, norm, forward_head), so that tokens are permuted before or after their PE is added; images
are never edited.

Every `update` takes a batch with its `valid` mask [B] (False: the eval loader's padding) and keeps its
sums and per-image values on the device: static shapes, weights instead of boolean indexing, no
`.item()`, no `bincount` (which reads its input's maximum on the host), so no batch waits for the
host. `result` is the one synchronisation, at the end; it returns accuracies as percentages (0-100),
distances in patches, cosines and displacements unitless.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from droppos import UserError, fastpaths

__all__ = ["PROBE_FILLS", "VARIANTS", "OrderSensitivity", "PositionAccuracy", "ProbeFeatures"]

VARIANTS = {  # report key -> (short label, what is done to the patch tokens)
    "with_pe": ("(a) with PE", "tokens permuted together with their PEs"),
    "pe_in_place": ("(b) PE in place", "tokens permuted, PEs left in place"),
    "no_pe": ("(c) no PE", "tokens permuted, no PEs at all"),
}
from droppos.recipes import PROBE_FILLS  # noqa: E402 - the one list of fills, with what each means


def _percent(hits: float, count: float) -> Optional[float]:
    return 100.0 * hits / count if count else None


# ----------------------------------------------------------------------------------------------
# ViT pieces


def _token_parts(vit: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(patch tokens [B,L,D] without PE, patch PEs [B,L,D], prefix tokens with their PE [B,P,D]).

    `_pos_embed` is affine in the patch tokens, so running it on zeros yields exactly what it adds to
    them and the prefix it prepends, whatever the model's variant (no_embed_class, registers, none).
    """
    x = vit.patch_embed(images)
    with_pe = fastpaths.vit_pos_embed(vit, torch.zeros_like(x))
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
# Position accuracy (the DropPos position head)


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

    def update(self, logits: torch.Tensor, positions: torch.Tensor, dropped: torch.Tensor, valid: torch.Tensor) -> None:
        """logits [B,V,L], true cells [B,V], dropped [B,V] (PE dropped: the patches scored), valid [B]."""
        weight = (dropped & valid[:, None]).flatten().double()
        logits, positions = logits.flatten(0, 1), positions.flatten()
        pred = logits.argmax(-1)
        hit = (pred == positions).double() * weight
        k = min(5, logits.shape[-1])
        self.top1 += hit.sum()
        self.top5 += ((logits.topk(k, dim=-1).indices == positions[:, None]).any(-1).double() * weight).sum()
        self.cell_count.index_add_(0, positions, weight)
        self.cell_correct.index_add_(0, positions, hit)
        self.sq_counts.index_add_(0, self.sq_dist[pred, positions], weight)

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
        chance_hist, _ = np.histogram(off_diag, bins=edges)
        cell_count = self.cell_count.cpu().numpy()
        cell = 100.0 * self.cell_correct.cpu().numpy() / np.maximum(cell_count, 1)
        cell[cell_count == 0] = np.nan
        return {
            "mask_ratio": self.mask_ratio,
            "pos_mask_ratio": self.pos_mask_ratio,
            "top1": _percent(float(self.top1), n),
            "top5": _percent(float(self.top5), n),
            "mean_error": float((errors * dist).sum() / num_errors) if num_errors else 0.0,
            "median_error": _weighted_median(dist, errors) if num_errors else 0.0,
            "mean_distance": float((counts * dist).sum() / n) if n else None,
            "chance_top1": 100.0 / self.num_patches,
            "chance_top5": 100.0 * min(5, self.num_patches) / self.num_patches,
            "chance_mean_error": float(off_diag.mean()) if off_diag.size else 0.0,
            "num_patches": self.num_patches,
            "grid": list(self.grid),
            "visible_per_image": self.num_visible,
            "dropped_per_image": self.num_visible - self.num_keep_pe,
            "patches_evaluated": int(n),
            "errors": int(num_errors),
            "error_histogram": {"bin_edges": edges.tolist(), "counts": [int(c) for c in hist],
                                "chance_share": (100.0 * chance_hist / max(1, self.num_patches ** 2)).tolist()},
            "cell_accuracy": [[None if np.isnan(v) else float(v) for v in row] for row in cell.reshape(self.grid)],
            "seed": seed,
            "distance": "Euclidean on the (row, col) patch grid, in patches; mean_error and median_error over wrong "
                        "top-1 answers only, mean_distance over all answers (right ones count 0)",
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


# ----------------------------------------------------------------------------------------------
# Token-order sensitivity (any ViT)


class OrderSensitivity:
    """How far the pooled feature moves (displacement, cosine, classifier agreement) under (a), (b), (c)."""

    def __init__(self, permutations: torch.Tensor, classifier: bool, labelled: bool) -> None:
        self.permutations = permutations  # [P, L]
        self.classifier, self.labelled = classifier, labelled
        # Per variant and permutation, one tensor per batch of: cosine, squared shift, agreement, correct.
        self.cos, self.shift, self.agree, self.correct = (_per_permutation(len(permutations)) for _ in range(4))
        self.correct_intact: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        # Weighted sums on the device: the intact features' spread (the displacement's unit) and the RMS of
        # the patch tokens and of their PEs (how visible the PEs are).
        self.sums: Optional[dict[str, torch.Tensor]] = None

    def update(self, vit: nn.Module, images: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> None:
        x, pe, prefix = _token_parts(vit, images)
        reference = _encode(vit, prefix, x + pe)
        ref_feat = _pooled(vit, reference).double()
        weight = valid.double()
        if self.sums is None:
            zero = weight.new_zeros(())
            self.sums = {"count": zero, "feat": ref_feat.new_zeros(ref_feat.shape[1]), "feat_sq": zero.clone(),
                         "token_sq": zero.clone(), "pe_sq": pe[0].double().square().mean()}
        self.sums["count"] += weight.sum()
        self.sums["feat"] += (ref_feat * weight[:, None]).sum(0)
        self.sums["feat_sq"] += (ref_feat.square().sum(-1) * weight).sum()
        self.sums["token_sq"] += (x.double().square().mean((1, 2)) * weight).sum()
        self.valid.append(valid)
        ref_pred = vit.forward_head(reference).argmax(-1) if self.classifier else None
        if ref_pred is not None:
            self.correct_intact.append(ref_pred == labels)
        for p, perm in enumerate(self.permutations):
            inputs = {"with_pe": (x + pe)[:, perm], "pe_in_place": x[:, perm] + pe, "no_pe": x[:, perm]}
            for key, patches in inputs.items():
                tokens = _encode(vit, prefix, patches)
                feat = _pooled(vit, tokens).double()
                self.cos[key][p].append(F.cosine_similarity(feat, ref_feat, dim=-1))
                self.shift[key][p].append((feat - ref_feat).square().sum(-1))
                if ref_pred is not None:
                    pred = vit.forward_head(tokens).argmax(-1)
                    self.agree[key][p].append(pred == ref_pred)
                    self.correct[key][p].append(pred == labels)

    def pair_distance(self) -> float:
        """Mean squared distance between the intact features of two different images (i != j)."""
        n = float(self.sums["count"])
        mean = self.sums["feat"] / n
        variance = float(self.sums["feat_sq"]) / n - float(mean.square().sum())  # total variance, population
        return max(0.0, variance) * 2 * n / (n - 1) if n > 1 else 0.0

    def rms(self) -> dict[str, float]:
        """RMS of the patch tokens (before their PE) and of the patch PEs: how visible the PEs are."""
        n = float(self.sums["count"])
        return {"patch_token_rms": math.sqrt(float(self.sums["token_sq"]) / n) if n else None,
                "patch_pe_rms": math.sqrt(float(self.sums["pe_sq"]))}

    def result(self, pool: str) -> dict[str, Any]:
        valid = torch.cat(self.valid)

        def stacked(per_permutation: list[list[torch.Tensor]]) -> torch.Tensor:  # [P, valid images]
            return torch.stack([torch.cat(batches) for batches in per_permutation])[:, valid]

        unit = self.pair_distance()
        out: dict[str, Any] = {}
        for key, (label, what) in VARIANTS.items():
            entry: dict[str, Any] = {"label": label, "what": what, **_spread("cosine", stacked(self.cos[key]))}
            if unit > 0:
                entry.update(_spread("displacement", stacked(self.shift[key]) / unit))
            else:  # every image gives the same feature: no scale to measure a change against
                entry.update(displacement_mean=None, displacement_std=None, displacement_sem=None,
                             displacement_per_permutation=None)
            if self.classifier:
                entry["top1_agreement"] = 100.0 * float(stacked(self.agree[key]).double().mean())
            if self.classifier and self.labelled:
                accuracy = 100.0 * float(stacked(self.correct[key]).double().mean())
                intact = 100.0 * float(torch.cat(self.correct_intact)[valid].double().mean())
                entry.update(accuracy=accuracy, accuracy_change=accuracy - intact)
            out[key] = entry
        if self.classifier and self.labelled:
            out["reference_accuracy"] = 100.0 * float(torch.cat(self.correct_intact)[valid].double().mean())
        out["settings"] = {
            "permutations": len(self.permutations),
            "feature": pool,
            "compared_with": "the same images, unpermuted, with every PE",
            "std": "*_std: over all (image, permutation) pairs",
            "sem": "*_sem: standard error of the mean over images (each image's value averaged over the permutations)",
            "displacement": "squared distance the feature moves, over the mean squared distance between the intact "
                            "features of two different images (0: unchanged, 1: as far as another image); unlike "
                            "the cosine it ignores the direction every image's feature shares",
            "prefix_tokens": "keep their PE in every variant",
        }
        return out


def _per_permutation(count: int) -> dict[str, list[list[torch.Tensor]]]:
    return {key: [[] for _ in range(count)] for key in VARIANTS}


def _spread(name: str, values: torch.Tensor) -> dict[str, Any]:
    """Mean, std over every (permutation, image) value, standard error over images, mean per permutation."""
    per_image = values.mean(0)
    images = per_image.numel()
    return {
        f"{name}_mean": float(values.mean()),
        f"{name}_std": float(values.std(unbiased=False)),
        f"{name}_sem": float(per_image.std() / math.sqrt(images)) if images > 1 else None,
        f"{name}_per_permutation": [float(v) for v in values.mean(1)],
    }


# ----------------------------------------------------------------------------------------------
# Position linear probe (any ViT)


class ProbeFeatures:
    """Output tokens of PE-dropped patches and their true cells, split into fitting / test parts.

    Images alternate by their index in the pass: even ones fit the probe, odd ones test it.
    """

    def __init__(self, num_patches: int, drop: float, fill: str, max_images: int, generator: torch.Generator,
                 mask_token: Optional[torch.Tensor] = None) -> None:
        self.num_patches, self.fill, self.max_images, self.generator = num_patches, fill, max_images, generator
        self.num_drop = math.floor(num_patches * drop + 1e-9)
        if self.num_drop < 1:
            raise UserError(f"--probe-drop {drop} drops no PE of {num_patches} patches: raise it")
        if fill == "mask-token" and mask_token is None:
            raise UserError("--probe-fill mask-token needs a model with a learnable [MASK] token")
        self.mask_token = mask_token
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {"fit": [], "test": []}
        self.images_seen = 0  # rows, padding included: the host knows it without asking the device
        self.valid: list[torch.Tensor] = []

    def _fill(self, pe: torch.Tensor) -> torch.Tensor:
        """[B or 1, 1, D]: what replaces a dropped PE."""
        if self.fill == "mean":
            return pe.mean(dim=1, keepdim=True)
        if self.fill == "zeros":
            return torch.zeros_like(pe[:, :1])
        return self.mask_token.to(pe.device, pe.dtype)

    def update(self, vit: nn.Module, images: torch.Tensor, valid: torch.Tensor) -> None:
        if self.max_images and self.images_seen >= self.max_images:
            return
        if self.max_images:
            images, valid = images[: self.max_images - self.images_seen], valid[: self.max_images - self.images_seen]
        batch = images.shape[0]
        noise = torch.rand(batch, self.num_patches, generator=self.generator, device=self.generator.device)
        dropped = torch.argsort(noise, dim=1)[:, : self.num_drop].to(images.device)  # [B, n] cells
        x, pe, prefix = _token_parts(vit, images)
        mask = torch.zeros(batch, self.num_patches, 1, dtype=torch.bool, device=images.device)
        mask.scatter_(1, dropped.unsqueeze(-1), True)
        tokens = _encode(vit, prefix, x + torch.where(mask, self._fill(pe).expand_as(pe), pe))[:, vit.num_prefix_tokens:]
        feats = torch.gather(tokens, 1, dropped.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        first_fit = self.images_seen % 2  # the first row whose index in the pass is even
        for name, start in (("fit", first_fit), ("test", 1 - first_fit)):
            rows = slice(start, None, 2)
            self.parts[name].append((feats[rows].flatten(0, 1).float(), dropped[rows].flatten(),
                                     valid[rows, None].expand(-1, self.num_drop).flatten()))
        self.valid.append(valid)
        self.images_seen += batch

    def _part(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        feats, cells, valid = (torch.cat(t) for t in zip(*self.parts[name]))
        return feats[valid], cells[valid]

    def result(self, grid: tuple[int, int], steps: int, seed: int) -> dict[str, Any]:
        from droppos.model import grid_sq_distances

        images = int(torch.cat(self.valid).sum()) if self.valid else 0
        settings = {
            "drop_ratio": self.num_drop / self.num_patches, "dropped_per_image": self.num_drop,
            "fill": PROBE_FILLS[self.fill],
            "split": "images alternate: even index fits the probe, odd index tests it",
            "classifier": "linear softmax over the L cells on standardised final-norm tokens; L-BFGS, L2 1e-4",
            "steps": steps, "seed": seed, "images": images,
        }
        if images < 2 or not self.parts["fit"] or not self.parts["test"]:
            return {"top1": None, "note": "needs at least 2 images", **settings}
        (fit_x, fit_y), (test_x, test_y) = self._part("fit"), self._part("test")
        if len(fit_y) == 0 or len(test_y) == 0:
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
                fit_top1 = 100.0 * float((head(fit_x).argmax(-1) == fit_y).double().mean())
                logits = head(test_x.clone())
        pred = logits.argmax(-1)
        dist = grid_sq_distances(grid, device=logits.device)[pred, test_y].sqrt()
        wrong = pred != test_y
        return {
            "top1": 100.0 * float((~wrong).double().mean()),
            "top5": 100.0 * float((logits.topk(min(5, self.num_patches), -1).indices == test_y[:, None]).any(-1).double().mean()),
            "mean_error": float(dist[wrong].mean()) if bool(wrong.any()) else 0.0,
            "mean_distance": float(dist.mean()),
            "fit_top1": fit_top1,
            "chance_top1": 100.0 / self.num_patches,
            "fit_tokens": int(len(fit_y)),
            "test_tokens": int(len(test_y)),
            **settings,
        }
