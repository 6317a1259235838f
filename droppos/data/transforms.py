"""What each data mode does to a sample, and the normalisation every batch gets: one table for both backends.

| mode | crop | flip | RandAugment | used by |
| --- | --- | --- | --- | --- |
| pretrain | RandomResizedCrop scale (0.2, 1) | yes | no | pre-training (MAE/DropPos `main_pretrain`) |
| finetune | RandomResizedCrop scale (0.08, 1) | yes | rand-m9-mstd0.5-inc1 | fine-tuning (MAE `main_finetune`) |
| probe | RandomResizedCrop scale (0.08, 1) | yes | no | linear-probe training (MAE `main_linprobe`) |
| segment | RandomResizedCrop scale (0.2, 1) | yes | no | segmentation-probe training (image and mask alike) |
| eval | resize the shorter side to size/0.875, centre crop | no | no | every evaluation |

Crops take aspect ratios in (3/4, 4/3) (log-uniform, 10 attempts, then the centre crop) and every
resize is bicubic, as in the published recipes (`interpolation=3`); RandAugment's own geometric
operations are bicubic too (timm's `interpolation` hparam, as `timm.data.create_transform(...,
interpolation='bicubic')` sets it: without it timm picks bilinear or bicubic at random per call).
Random erasing, mixup and cutmix act on whole batches on the device (`batch_augment`).

`segment`'s crop areas span what MMSegmentation's ADE20K pipeline gives (resize by 0.5-2 of 512 px,
then a 512 px random crop: 0.19 to the whole image): its crop box and flip are drawn once and applied
to the label map too (nearest). Label maps are read in any mode without RandAugment (whose
geometric operations are not paired).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 0.875
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # timm's config string


@dataclass(frozen=True)
class Recipe:
    """The per-sample augmentation of one mode; `crop_scale` None means eval's resize + centre crop."""

    crop_scale: tuple[float, float] | None
    flip: bool
    rand_augment: bool

    @property
    def training(self) -> bool:
        return self.crop_scale is not None


RECIPES = {
    "pretrain": Recipe(crop_scale=(0.2, 1.0), flip=True, rand_augment=False),
    "finetune": Recipe(crop_scale=(0.08, 1.0), flip=True, rand_augment=True),
    "probe": Recipe(crop_scale=(0.08, 1.0), flip=True, rand_augment=False),
    "segment": Recipe(crop_scale=(0.2, 1.0), flip=True, rand_augment=False),
    "eval": Recipe(crop_scale=None, flip=False, rand_augment=False),
}
MODES = tuple(RECIPES)


def rand_augment_hparams(img_size: int) -> dict:
    """timm's RandAugment hparams as `timm.data.create_transform` builds them, bicubic made explicit."""
    from PIL import Image

    return dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN),
                interpolation=Image.BICUBIC)


def normalize(images: torch.Tensor, device: torch.device | str, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B,H,W,3] (any device) -> float32 [B,3,H,W] ImageNet-normalised on `device` (or into `out`).

    A few flat passes (convert-and-reorder, scale, shift, in place) rather than one broadcast
    `(x - mean) / std` that mixes dtypes and layouts (much slower on the CPU). On the CPU it runs
    in numpy, single-threaded on purpose: it runs in the main process while loader workers keep
    every core busy, and torch's intra-op threads would spin at their barriers (figures:
    docs/measurements.md). Same float32 operations, so the same bits as the torch path.
    """
    if torch.device(device).type == "cpu" and images.device.type == "cpu":
        if out is None:
            batch, height, width, _ = images.shape
            out = torch.empty((batch, 3, height, width), dtype=torch.float32)
        dst = out.numpy()
        np.multiply(images.numpy().transpose(0, 3, 1, 2), np.array(_SCALE, np.float32).reshape(1, 3, 1, 1),
                    out=dst, dtype=np.float32)
        np.add(dst, np.array(_SHIFT, np.float32).reshape(1, 3, 1, 1), out=dst)
        return out
    images = images.to(device, non_blocking=True)
    if out is None:
        batch, height, width, _ = images.shape
        out = torch.empty((batch, 3, height, width), dtype=torch.float32, device=images.device)
    out.copy_(images.permute(0, 3, 1, 2))
    scale, shift = _constants(out.device)
    return out.mul_(scale).add_(shift)


_SCALE = tuple(1.0 / (255.0 * s) for s in IMAGENET_STD)
_SHIFT = tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


@functools.lru_cache(maxsize=None)
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize's per-channel scale and shift on `device`, made once: a tensor built from a list per
    batch would be a blocking host-to-device copy, which waits for everything queued on the stream."""
    return (torch.tensor(_SCALE, dtype=torch.float32, device=device).view(1, 3, 1, 1),
            torch.tensor(_SHIFT, dtype=torch.float32, device=device).view(1, 3, 1, 1))


def batch_augment(
    num_classes: int,
    mixup: float = 0.8,
    cutmix: float = 1.0,
    label_smoothing: float = 0.1,
    reprob: float = 0.25,
    device: torch.device | str = "cpu",
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Fine-tuning's batch-level augmentation on the training device, with timm's implementations.

    Returns f(images normalised [B,3,H,W], labels int64 [B]) -> (images, soft targets [B, classes]):
    random erasing (per sample, probability `reprob`, pixel mode) then mixup/cutmix with label
    smoothing (or smoothing alone when both alphas are 0). B must be even when mixing.
    Both draw from the main process's global RNGs (erasing: python's `random` and torch; mixup:
    numpy's): a stage that resumes exactly seeds those streams from its step (finetune's seed_step).
    """
    from timm.data import Mixup
    from timm.data.mixup import mixup_target
    from timm.data.random_erasing import RandomErasing

    erase = RandomErasing(probability=reprob, mode="pixel", max_count=1, device=str(device)) if reprob > 0 else None
    mix = (
        Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
        if mixup > 0 or cutmix > 0 else None
    )

    def apply(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if erase is not None:
            images = erase(images)
        if mix is not None:
            return mix(images, labels)
        return images, mixup_target(labels, num_classes, smoothing=label_smoothing)

    return apply
