"""Label maps in a `droppos shard` dataset: the segmentation part of the dataset contract (torch-free).

A segmentation dataset's samples carry `{key}.seg.png` beside `{key}.jpg`: a single-channel PNG
(8-bit L or palette, or 16-bit I;16 when a label exceeds 255) the size of the stored JPEG, holding
the label values *as the source stored them* (lossless: the source PNG's bytes when they can be
kept). `manifest.json` then has `"task": "segmentation"` and a `"segmentation"` object saying how to
read those values, with MMSegmentation's names and meaning:

- `classes`: the class names; class c is label c of the loader's output (0-based);
- `reduce_zero_label`: true when stored 0 means "unlabelled" and stored v is class v - 1 (ADE20K:
  0 is "other", 1..150 the classes). Stored, not applied: the shards keep the source's values;
- `ignore_index`: the stored value that means "unlabelled" (MMSegmentation's default 255), or null;
- `image_classes`: whether the samples' `cls`/`lbl` are real image-level classes (class folders)
  or a placeholder (class 0 of one class `none`, for sources without image classes, e.g. ADE20K).

The loaders turn stored values into int64 labels with `IGNORE` (-1) for unlabelled pixels (and for
eval padding) through one lookup table (`train_lut`): the same labels whatever the source convention.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

MASK_COMPONENT = "seg.png"  # the sample component of a label map
TASK = "segmentation"  # manifest["task"] of a dataset with label maps (absent: classification)
IGNORE = -1  # the loaders' label of an unlabelled pixel and of an eval-padding slot
MAX_CLASSES = 32767  # the loaders carry labels as int16
NO_IMAGE_CLASS = "none"  # the one image class of a dataset whose images have none
DEFAULT_IGNORE_INDEX = 255  # MMSegmentation's
MASK_MODES = ("L", "P", "I;16")  # what a stored label map decodes to (8-bit gray, palette indices, 16-bit)

# ADE20K (SceneParsing, ADEChallengeData2016): label v of its PNGs is class v - 1 of these; 0 is "other".
# The names are MMSegmentation's (mmseg/datasets/ade.py), the short forms of objectInfo150's.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


class BadManifest(ValueError):
    """The manifest's segmentation block is malformed (the message says what)."""


@dataclass(frozen=True)
class SegSpec:
    """How to read a dataset's stored label values (see the module docstring)."""

    classes: tuple[str, ...]
    ignore_index: Optional[int] = DEFAULT_IGNORE_INDEX
    reduce_zero_label: bool = False
    image_classes: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def record(self) -> dict[str, Any]:
        """The manifest's `segmentation` object."""
        return {"classes": list(self.classes), "ignore_index": self.ignore_index,
                "reduce_zero_label": self.reduce_zero_label, "image_classes": self.image_classes}

    def class_of(self, stored: np.ndarray) -> np.ndarray:
        """Stored values -> class indices (int64), IGNORE where unlabelled; out-of-range values stay out of range."""
        values = stored.astype(np.int64)
        labels = values - 1 if self.reduce_zero_label else values.copy()
        unlabelled = values == self.ignore_index if self.ignore_index is not None else np.zeros(values.shape, bool)
        if self.reduce_zero_label:
            unlabelled |= values == 0
        labels[unlabelled] = IGNORE
        return labels

    def out_of_range(self, stored: np.ndarray) -> list[int]:
        """The distinct stored values that are neither a class nor unlabelled (empty: a valid label map)."""
        present = np.unique(stored)
        labels = self.class_of(present)
        bad = (labels != IGNORE) & ((labels < 0) | (labels >= self.num_classes))
        return [int(v) for v in present[bad]]

    def train_lut(self, bits: int = 16) -> np.ndarray:
        """int16 [2**bits]: stored value -> the loaders' label (class index, or IGNORE)."""
        labels = self.class_of(np.arange(1 << bits))
        labels[(labels < 0) | (labels >= self.num_classes)] = IGNORE  # a shard never holds these; never a class
        return labels.astype(np.int16)

    def describe(self) -> str:
        """The stored convention in words (manifest readers, error messages)."""
        parts = [f"{self.num_classes} classes"]
        if self.reduce_zero_label:
            parts.append("stored 0 = unlabelled, stored v = class v-1 (reduce_zero_label)")
        if self.ignore_index is not None:
            parts.append(f"stored {self.ignore_index} = unlabelled")
        return ", ".join(parts)


def spec_from_manifest(manifest: dict, where: str = "manifest.json") -> Optional[SegSpec]:
    """The dataset's SegSpec, None for a classification dataset; a malformed block raises BadManifest."""
    task = manifest.get("task", "classification")
    if task == "classification":
        return None
    if task != TASK:
        raise BadManifest(f"{where}: unknown task {task!r} (expected classification or {TASK})")
    block = manifest.get("segmentation")
    if not isinstance(block, dict):
        raise BadManifest(f"{where}: task {TASK} without a 'segmentation' object")
    classes, ignore = block.get("classes"), block.get("ignore_index")
    reduce, image_classes = block.get("reduce_zero_label"), block.get("image_classes")
    if (not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES
            or not all(isinstance(c, str) for c in classes)):
        raise BadManifest(f"{where}: segmentation classes must be a list of 1..{MAX_CLASSES} names")
    if ignore is not None and (type(ignore) is not int or not 0 <= ignore <= 65535):
        raise BadManifest(f"{where}: segmentation ignore_index must be null or an integer in 0..65535")
    if type(reduce) is not bool or type(image_classes) is not bool:
        raise BadManifest(f"{where}: segmentation reduce_zero_label and image_classes must be true or false")
    return SegSpec(tuple(classes), ignore, reduce, image_classes)


def label_array(im: Any) -> np.ndarray:
    """A decoded label-map image (Pillow) as uint8 (L, P) or uint16 (I;16) values."""
    if im.mode in ("L", "P"):
        return np.asarray(im, dtype=np.uint8)
    if im.mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    raise ValueError(f"a label map must be {', '.join(MASK_MODES)}, not {im.mode}")


def decode_label_map(data: bytes) -> np.ndarray:
    """A stored `seg.png` as its label values ([H, W] uint8 or uint16); raises on anything else."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError(f"a label map must be a PNG, not {im.format}")
        im.load()
        return label_array(im)


def encode_label_map(labels: np.ndarray) -> bytes:
    """Label values [H, W] -> PNG bytes: 8-bit L when every value fits, else 16-bit (I;16). Lossless."""
    from PIL import Image

    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 65535):
        raise ValueError("label values must lie in 0..65535")
    fits8 = not labels.size or int(labels.max()) <= 255
    im = Image.fromarray(labels.astype(np.uint8 if fits8 else np.uint16))  # L or I;16
    buffer = io.BytesIO()
    im.save(buffer, "PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
