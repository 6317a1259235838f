"""Dense (per-pixel) transfer on frozen features: patch-token maps, the linear segmentation head, exact
mIoU and pixel accuracy, and a picture of predictions.

The protocol is the linear one of DINOv2 and iBOT: a frozen ViT's patch tokens (the last block's, or
the last N blocks' concatenated, each through the final norm, as DINOv2's `get_intermediate_layers(n,
norm=True)`), BatchNorm + a 1x1 convolution (DINOv2's `BNHead`), logits upsampled bilinearly to the
label map, cross-entropy that ignores unlabelled pixels. Scores come from a confusion matrix counted
on the device (`index_add_`: no host sync, no data-dependent shape) and summed across ranks, so they
are exact over every val pixel: IoU_c = TP / (TP + FP + FN) per class, mIoU the mean over the classes
that occur in the labels or the predictions (MMSegmentation's nanmean), pixel accuracy TP / labelled
pixels; every figure a percentage.
"""

from __future__ import annotations

import colorsys
import io
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from droppos.labelmaps import IGNORE


class PatchFeatures(nn.Module):
    """A frozen timm ViT's patch tokens as a feature map [B, layers x C, H/p, W/p]."""

    def __init__(self, encoder: nn.Module, layers: int = 1) -> None:
        super().__init__()
        depth = len(encoder.blocks)
        if not 1 <= layers <= depth:
            raise ValueError(f"layers must be in 1..{depth} (the encoder's blocks), got {layers}")
        self.encoder, self.layers = encoder, layers
        self.num_features = int(encoder.num_features) * layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.encoder.forward_intermediates(images, indices=self.layers, norm=True, output_fmt="NCHW",
                                                  intermediates_only=True)
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)


class SegHead(nn.Module):
    """BatchNorm2d + 1x1 convolution over patch features; logits upsampled (bilinear) to the label map's size."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.conv = nn.Conv2d(num_features, num_classes, kernel_size=1)
        nn.init.trunc_normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        logits = self.conv(self.bn(features))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def pixel_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over labelled pixels (0 for a batch without any: never NaN)."""
    total = F.cross_entropy(logits, masks, ignore_index=IGNORE, reduction="sum")
    return total / (masks != IGNORE).sum().clamp(min=1)


def pixel_accuracy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The share of labelled pixels predicted right (a 0-dim fraction on the device)."""
    labelled = masks != IGNORE
    return ((logits.argmax(1) == masks) & labelled).sum() / labelled.sum().clamp(min=1)


class ConfusionMatrix:
    """Pixel counts [truth, prediction] of `num_classes` classes, accumulated on the device."""

    def __init__(self, num_classes: int, device: torch.device | str) -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=device)  # + a discard bin
        self.images = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, predictions: torch.Tensor, masks: torch.Tensor, real: Optional[torch.Tensor] = None) -> None:
        """Add a batch: predicted classes and labels [B, H, W]; unlabelled pixels (IGNORE) are not counted.
        `real` [B] marks the batch's real images (the rest is eval padding, whose masks are IGNORE)."""
        k = self.num_classes
        labelled = (masks >= 0) & (masks < k)
        index = torch.where(labelled, masks * k + predictions, torch.full_like(masks, k * k))
        self.counts.index_add_(0, index.flatten(), torch.ones_like(index.flatten()))
        self.images += masks.shape[0] if real is None else real.sum()

    def all_reduce(self) -> None:
        """Sum the counts of every rank (each rank counted its own val samples, so each pixel counts once)."""
        torch.distributed.all_reduce(self.counts)
        torch.distributed.all_reduce(self.images)

    def scores(self, class_names: Sequence[str]) -> dict[str, Any]:
        """mIoU, pixel accuracy and per-class IoU (percent; None for a class in neither labels nor predictions)."""
        k = self.num_classes
        matrix = self.counts[: k * k].view(k, k).double().cpu()
        hits, truth, predicted = matrix.diagonal(), matrix.sum(1), matrix.sum(0)
        union = truth + predicted - hits
        iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, math.nan))
        present = ~torch.isnan(iou)
        pixels = int(truth.sum())
        return {
            "miou": 100.0 * float(iou[present].mean()) if present.any() else 0.0,
            "pixel_acc": 100.0 * float(hits.sum()) / pixels if pixels else 0.0,
            "per_class_iou": {name: (None if math.isnan(v) else 100.0 * v) for name, v in zip(class_names, iou.tolist())},
            "per_class_pixels": {name: int(v) for name, v in zip(class_names, truth.tolist())},
            "num_eval_pixels": pixels,
            "num_eval_images": int(self.images),
        }


# ---------------------------------------------------------------------------------------------
# A picture of predictions


def palette(num_classes: int) -> np.ndarray:
    """uint8 [num_classes + 1, 3]: one distinct colour per class (golden-ratio hues), black last (unlabelled)."""
    colours = [colorsys.hls_to_rgb((i * 0.618033988749895) % 1.0, 0.45 + 0.2 * (i % 3) / 2, 0.85)
               for i in range(num_classes)]
    return np.array([*(tuple(round(255 * c) for c in rgb) for rgb in colours), (0, 0, 0)], dtype=np.uint8)


def prediction_grid(images: np.ndarray, masks: np.ndarray, predictions: np.ndarray, num_classes: int,
                    tile: int = 128) -> bytes:
    """A PNG with one row per image: the image, its labels, the prediction (unlabelled pixels black).

    `images` uint8 [N, H, W, 3], `masks` and `predictions` int [N, H, W] (masks IGNORE where unlabelled).
    """
    from PIL import Image, ImageDraw

    colours = palette(num_classes)
    rows, gap, header = len(images), 4, 16
    canvas = Image.new("RGB", (3 * tile + 4 * gap, header + rows * (tile + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(("image", "labels", "prediction")):
        draw.text((gap + column * (tile + gap), 2), title, fill=(0, 0, 0))
    for row in range(rows):
        truth = np.where((masks[row] >= 0) & (masks[row] < num_classes), masks[row], num_classes)
        tiles = (images[row], colours[truth], colours[np.clip(predictions[row], 0, num_classes - 1)])
        for column, pixels in enumerate(tiles):
            picture = Image.fromarray(np.ascontiguousarray(pixels)).resize((tile, tile), Image.NEAREST)
            canvas.paste(picture, (gap + column * (tile + gap), header + gap + row * (tile + gap)))
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    return buffer.getvalue()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Normalised float images [B, 3, H, W] (droppos.data.normalize) back to uint8 [B, H, W, 3] for display."""
    from droppos.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    pixels = ((images.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def write_predictions(path: Path, images: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor,
                      num_classes: int) -> Path:
    """OUT/predictions.png from a batch: normalised images, label maps and logits [B, K, H, W]."""
    from droppos.files import write_bytes_atomic

    data = prediction_grid(to_uint8(images), masks.cpu().numpy(), logits.argmax(1).cpu().numpy(), num_classes)
    write_bytes_atomic(Path(path), data)
    return Path(path)
