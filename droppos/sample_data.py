"""Built-in sample data: a deterministic, procedural ImageNet-style folder.

Why procedural scenes and not noise: DropPos learns *where* a patch came from using
appearance alone, and evaluation needs a class to recognise. Every scene therefore
shares a layout that makes position learnable (sky above a horizon, ground whose
texture grows with perspective towards the bottom, light and a sun from the upper
left, a vignette), while each class has its own object shape, colour and ground
texture. Sizes and aspect ratios vary (96-320 px) like web photos do.

Every image depends only on (seed, split, class, index), so generation is
deterministic, parallel and resumable (complete files are skipped).

With `masks=True` every image also gets its label map, `masks/{split}/<class>/<name>.png`, drawn
from the same geometry (no extra random draw: the images are byte-identical with and without
masks), and `classes.txt` names its labels: 0 sky, 1 ground, 2 + k the object of class k. The
ImageNet-style folder plus `masks/` is what `droppos shard` reads as a segmentation dataset that
also keeps its image classes. Why these classes: sky against ground is decided by where a patch
lies relative to a horizon that moves from image to image (position and appearance together, the
location awareness DropPos trains), and each object's class by its shape and colour (recognition).
"""

from __future__ import annotations

import colorsys
import io
import math
import os
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "ring", "cross", "bars")
TEXTURES = ("stripes", "checker", "dots", "grass", "waves")
SPLITS = {"train": 0, "val": 1}
MIN_SIDE, MAX_SIDE = 96, 320
SKY, GROUND, FIRST_OBJECT = 0, 1, 2  # label-map values; the object of class k is FIRST_OBJECT + k
MASKS_DIR, CLASSES_FILE = "masks", "classes.txt"


def class_names(num_classes: int) -> list[str]:
    """Names sort in class order: `00_circle_stripes`, `01_square_checker`, ..."""
    width = max(2, len(str(num_classes - 1)))
    return [f"{i:0{width}d}_{_shape(i)}_{_texture(i)}" for i in range(num_classes)]


def _shape(i: int) -> str:
    return SHAPES[i % len(SHAPES)]


def _texture(i: int) -> str:
    return TEXTURES[(i + i // len(SHAPES)) % len(TEXTURES)]


def seg_class_names(num_classes: int) -> list[str]:
    """The label-map classes, in label order: sky, ground, then one object class per image class."""
    return ["sky", "ground", *(f"object {name}" for name in class_names(num_classes))]


def _class_rgb(i: int, lightness: float = 0.5, saturation: float = 0.85) -> np.ndarray:
    hue = (i * 0.618033988749895) % 1.0  # golden-ratio hues: distinct for any class count
    return np.array(colorsys.hls_to_rgb(hue, lightness, saturation), dtype=np.float32)


def render(class_index: int, rng: np.random.Generator) -> Image.Image:
    """One scene of class `class_index`, as an RGB image of random size."""
    return render_scene(class_index, rng)[0]


def render_scene(class_index: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """One scene of class `class_index` and its label map (mode L: SKY, GROUND, FIRST_OBJECT + class).

    The label map is drawn from the geometry the image is drawn from, and takes no random draw.
    """
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    ys = (np.arange(h, dtype=np.float32) + 0.5)[:, None] / h  # 0 top .. 1 bottom
    xs = (np.arange(w, dtype=np.float32) + 0.5)[None, :] / w  # 0 left .. 1 right
    horizon = float(rng.uniform(0.42, 0.62))

    # Sky: deep blue at the top fading to a pale horizon; the same for every class.
    t = np.clip(ys / horizon, 0, 1)[..., None]
    sky = (1 - t) * np.array([0.18, 0.32, 0.70], np.float32) + t * np.array([0.80, 0.86, 0.95], np.float32)
    sun_x, sun_y = rng.uniform(0.08, 0.35), rng.uniform(0.06, 0.22) * horizon / 0.5
    sun = np.exp(-(((xs - sun_x) * w) ** 2 + ((ys - sun_y) * h) ** 2) / (2 * (0.07 * min(w, h)) ** 2))
    sky = sky + sun[..., None] * np.array([1.0, 0.9, 0.6], np.float32)

    # Ground: class colour with a class texture whose scale grows towards the viewer.
    depth = np.clip((ys - horizon) / (1 - horizon), 1e-3, 1)  # 0 at horizon .. 1 at bottom
    ground = _class_rgb(class_index, lightness=0.42, saturation=0.45)[None, None, :] * (0.65 + 0.35 * depth[..., None])
    pattern = _ground_texture(_texture(class_index), xs, depth, w, h, rng)
    ground = ground * (0.75 + 0.25 * pattern[..., None])
    img = np.where((ys < horizon)[..., None], sky, ground).astype(np.float32)

    # Warm light from the left, cool shade on the right, a vignette towards the corners:
    # together with sky above and ground below, every patch's colour says where it is.
    img *= (1.15 - 0.3 * xs)[..., None]
    img += (xs - 0.5)[..., None] * np.array([-0.16, 0.0, 0.16], np.float32)
    img *= (1.0 - 0.35 * ((xs - 0.5) ** 2 + (ys - 0.5) ** 2) * 2)[..., None]
    img += rng.normal(0, 0.015, size=img.shape).astype(np.float32)
    image = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")
    mask = Image.fromarray(np.where(ys < horizon, SKY, GROUND).astype(np.uint8).repeat(w, axis=1))
    _draw_object(image, mask, class_index, horizon, rng)
    return image, mask


def _ground_texture(kind: str, xs: np.ndarray, depth: np.ndarray, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A [h, w] pattern in [0, 1]; perspective: frequency falls as depth grows."""
    phase = rng.uniform(0, 2 * math.pi)
    freq = float(rng.uniform(5, 8))
    row = freq / (depth + 0.15)  # rows get wider towards the bottom
    col = (xs - 0.5) * freq * 2 / (depth + 0.3)
    if kind == "stripes":
        p = 0.5 + 0.5 * np.sin(row * 2 + phase)
    elif kind == "checker":
        p = ((np.floor(row) + np.floor(col + phase)) % 2).astype(np.float32)
    elif kind == "dots":
        p = ((np.sin(row * 3 + phase) * np.sin(col * 3)) > 0.6).astype(np.float32)
    elif kind == "grass":
        p = 0.5 + 0.5 * np.sin(col * 9 + phase + 0.4 * np.sin(row * 7))
    else:  # waves
        p = 0.5 + 0.5 * np.sin(row * 2 + 1.5 * np.sin(col * 2 + phase))
    return np.broadcast_to(p, (h, w)).astype(np.float32)


def _draw_object(image: Image.Image, mask: Image.Image, class_index: int, horizon: float,
                 rng: np.random.Generator) -> None:
    """The class object standing on the ground, with its shadow cast to the right (the shadow is ground)."""
    w, h = image.size
    size = float(rng.uniform(0.18, 0.34)) * min(w, h)
    cx = float(rng.uniform(0.25, 0.75)) * w
    base = float(rng.uniform(horizon + 0.08, 0.92)) * h
    cy = base - size / 2
    draw = ImageDraw.Draw(image)
    shadow = [cx - size * 0.3, base - size * 0.08, cx + size * 0.9, base + size * 0.08]
    draw.ellipse(shadow, fill=(30, 30, 30))
    rgb = tuple(int(255 * v) for v in _class_rgb(class_index, lightness=0.55, saturation=0.9))
    dark = tuple(int(v * 0.55) for v in rgb)
    light = tuple(min(255, v + 60) for v in rgb)
    shape = _shape(class_index)
    _paint_object(draw, shape, cx, cy, size / 2, rgb, dark, light)
    label = FIRST_OBJECT + class_index
    _paint_object(ImageDraw.Draw(mask), shape, cx, cy, size / 2, label, label, label)  # the same strokes


def _paint_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, body, edge, light) -> None:
    """The object's strokes in the given colours (an RGB image) or label (a label map): the same pixels."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=body, outline=edge, width=2)
    elif shape == "square":
        draw.rectangle(box, fill=body, outline=edge, width=2)
    elif shape == "ring":
        draw.ellipse(box, outline=body, width=max(3, int(r / 3)))
    elif shape == "cross":
        draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=body)
        draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=body)
    elif shape == "bars":
        for k in range(3):
            x0 = cx - r + k * (2 * r / 3)
            draw.rectangle([x0, cy - r, x0 + r / 3, cy + r], fill=body)
    else:
        n, ratio = {"triangle": (3, 1.0), "diamond": (4, 1.0), "star": (5, 0.45)}[shape]
        points = []
        for k in range(n * (2 if ratio < 1 else 1)):
            radius = r if (ratio == 1 or k % 2 == 0) else r * ratio
            angle = -math.pi / 2 + k * math.pi * (2 if ratio == 1 else 1) / n
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=body, outline=edge)
    # Highlight on the lit (left) side.
    draw.ellipse([cx - r * 0.6, cy - r * 0.6, cx - r * 0.25, cy - r * 0.25], fill=light)


def _jobs(root: Path, names: list[str], counts: dict[str, int], seed: int, masks: bool) -> Iterator[tuple]:
    for split, count in counts.items():
        for class_index, name in enumerate(names):
            yield root, split, class_index, name, count, seed, masks


def _write_class(job: tuple) -> int:
    """Write the missing images (and label maps) of one (split, class); returns how many scenes it drew."""
    root, split, class_index, name, count, seed, masks = job
    folder = root / split / name
    folder.mkdir(parents=True, exist_ok=True)
    mask_folder = root / MASKS_DIR / split / name
    if masks:
        mask_folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(count):
        path = folder / f"{name}_{index:05d}.jpg"
        mask_path = mask_folder / f"{name}_{index:05d}.png"
        if path.exists() and (not masks or mask_path.exists()):
            continue
        rng = np.random.default_rng([seed, SPLITS[split], class_index, index])
        image, mask = render_scene(class_index, rng)
        quality = int(rng.integers(80, 96))
        if not path.exists():
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
            _write_complete(path, buffer.getvalue())
        if masks and not mask_path.exists():
            buffer = io.BytesIO()
            mask.save(buffer, "PNG")
            _write_complete(mask_path, buffer.getvalue())
        written += 1
    return written


def _write_complete(path: Path, data: bytes) -> None:
    """Write through a hidden temporary name: a file that exists is complete, and a killed run leaves only a
    hidden temporary, which `droppos shard` counts and skips as a hidden file. No fsync: the sample data is
    generated again from its seed, and 3,100 fsyncs would cost more than the generation."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def generate(
    root: Path,
    num_classes: int = 10,
    train_per_class: int = 260,
    val_per_class: int = 50,
    seed: int = 0,
    workers: int = 1,
    masks: bool = False,
) -> Path:
    """Write the sample folder `root/{train,val}/<class>/*.jpg` (with `masks`: also `root/masks/{train,val}/<class>/*.png`
    and `root/classes.txt`); skips complete files."""
    root = Path(root)
    names = class_names(num_classes)
    counts = {split: n for split, n in (("train", train_per_class), ("val", val_per_class)) if n > 0}
    jobs = list(_jobs(root, names, counts, seed, masks))
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            list(pool.imap_unordered(_write_class, jobs))
    else:
        for job in jobs:
            _write_class(job)
    if masks:
        root.mkdir(parents=True, exist_ok=True)
        _write_complete(root / CLASSES_FILE, "".join(f"{name}\n" for name in seg_class_names(num_classes)).encode())
    return root
