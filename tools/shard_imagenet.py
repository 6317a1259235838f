"""`droppos shard`: an ImageNet-style folder (or list files) -> validated WebDataset shards.

Why this stage is strict: DALI has no per-sample skip (one corrupt image ends the
pipeline), applies EXIF orientation where Pillow does not, and its shuffle is only a
local buffer. So every input is fully decoded here; whatever DALI and Pillow could
disagree on (CMYK, grayscale, 16-bit, palette, alpha, non-JPEG data, EXIF rotation,
progressive or damaged JPEG structure) is converted to an RGB baseline JPEG; what
cannot be decoded is skipped and reported; the samples are globally shuffled before
they are written. A valid RGB baseline JPEG keeps its original bytes.

Progressive JPEGs are re-encoded (at --quality): the dataset contract promises
baseline JPEGs, which every decoder, including nvJPEG's hardware path, takes fast.
The generation loss touches those images only; manifest.json counts them
(conversions.progressive), so its size is known for any data set.

Layout of the work: the shuffled candidates of a split are cut into shards of
`shard_size` *candidates* (a shard holds fewer samples when some are skipped), so
every shard's content is known before anything is decoded. That makes the shards
independent, and a shard is the unit of parallel work (one task per worker process):
each is written to a temporary name, fsynced, renamed, then recorded in an append-only
progress log (OUT/.shard-progress.jsonl); a re-run verifies what the log records (the tar's
sha256, and its DALI index entry by entry against the tar's headers) and writes only the
rest. `manifest.json` is written last, so it never lists a partial shard. A shard whose
candidates are all skipped is not written (and not listed). One `shard` runs per OUT at a
time (`files.OutputLock`); an OS error while writing (full disk, read-only OUT) ends the
run with one line, temporaries removed, finished shards and the progress log kept.

What counts as an input: regular files and symlinks to them, found by listing
SOURCE/{train,val}/<class>/**. Everything else the listing meets is counted and skipped
with its reason, so written + skipped = found always holds: hidden files and folders,
FIFOs, sockets and devices (never opened: a FIFO would block the read forever), symlinks
to folders (not followed), folders that cannot be listed (one entry each), the files of a
class folder whose name is not valid UTF-8. A file name that is not valid UTF-8 is
written: its sample's `.json` (and a skipped.jsonl line) keeps the name, with U+FFFD for
the bad bytes, in `path`, and the original bytes, base64, in `path_bytes`. With --list,
an entry that resolves outside SOURCE through a symlink is skipped unread.

Segmentation data (image + label-map pairs) is recognised by its layout (`layout="auto"`):
ADE20K's (`[ADEChallengeData2016/]images/{training,validation}/*.jpg` with
`annotations/{training,validation}/*.png`: 150 classes, stored 0 = "other", MMSegmentation's
reduce_zero_label) or the generic one: `masks/{split}/REL.png` beside each image `{split}/REL` or
`images/{split}/REL`, with `classes.txt` (line i names label i; stored 255 = unlabelled unless
`ignore_index` says otherwise). Images in class folders (`{split}/<class>/...`) keep their image
classes; otherwise every sample gets class 0 of the one class `none`. Each sample then also holds
`{key}.seg.png`: the source PNG's bytes when they can be kept, else its label values re-encoded
losslessly (8-bit L, or 16-bit when a label exceeds 255). A label map goes through the checks an
image goes through, and is skipped with its image, for its own reasons (missing, undecodable, not a
single-channel PNG, another size than its image, labels that are neither a class nor unlabelled,
an EXIF orientation other than its image's: which pixel grid the labels follow would be a guess,
so both are refused rather than aligned by guess; when they agree both are turned alike). A label
map without an image is found and skipped too, so written + skipped = found still holds (found
counts images and unmatched label maps). `manifest.json` records the task, the classes, the
ignore index and whether labels are stored shifted (droppos.labelmaps: the source's values are
stored, never shifted; `reduce_zero_label` says how to read them).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import signal
import stat
import struct
import sys
import tarfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError, features

from droppos import UserError
from droppos.files import (
    OutputLock, fsync_dir, output_error, remove_stale_temporaries, temporary_path, write_bytes_atomic, write_json_atomic,
    write_text_atomic,
)
from droppos.labelmaps import (
    ADE20K_CLASSES, DEFAULT_IGNORE_INDEX, MASK_COMPONENT, MAX_CLASSES, NO_IMAGE_CLASS, TASK, BadManifest, SegSpec,
    decode_label_map, encode_label_map, spec_from_manifest,
)
from droppos.manifest import FORMAT, MANIFEST_NAME, ShardEntry, file_sha256, load_manifest, split_shards
from droppos.recipes import SHARD_LAYOUTS as LAYOUTS  # what SOURCE holds (auto: recognised from its folders)

IMAGENET_SPLITS = ("train", "val")
PROGRESS_LOG = ".shard-progress.jsonl"
SKIPPED_NAME = "skipped.jsonl"
TAR_MTIME = 946684800  # 2000-01-01: fixed, so the same input and options give byte-identical tars
TAR_BLOCK = 512
INDEX_VERSION = "v1.2"  # the index format of DALI's wds2idx
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
LOG_EVERY_S = 15.0
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame, not DHT/JPG/DAC
JPEG_DRAFT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg decodes at, largest first (what Image.draft picks)
# Pillow's name of an optional decoder -> (what a user calls it, the Debian package of its headers).
CODECS = {"webp": ("WebP", "libwebp-dev"), "libtiff": ("libtiff", "libtiff-dev"), "jpeg2k": ("JPEG 2000", "libopenjp2-7-dev")}
_MISSING_DECODER = re.compile(r"decoder (\w+) not available")
NOT_IN_A_CLASS = "not inside a class folder"
ADE20K_ROOT = "ADEChallengeData2016"
ADE20K_SPLITS = {"train": "training", "val": "validation"}
MASKS_ROOT, CLASSES_FILE = "masks", "classes.txt"  # the generic segmentation layout
BAD_CLASS_NAME = "in a class folder whose name is not valid UTF-8 (class names are text): rename the folder"


class SkipImage(Exception):
    """An input that cannot become a sample; the message is the reason written to skipped.jsonl."""


class Candidate(NamedTuple):
    """One input file: its path relative to SOURCE (POSIX), its class index (-1: none) and, for
    segmentation data, the path of its label map relative to SOURCE."""

    path: str
    label: int
    mask: Optional[str] = None


class Converted(NamedTuple):
    """A decoded and validated image: the JPEG bytes to store and what was done to get them.

    `width`/`height` are the input's stored size; `orientation` the EXIF orientation applied (1:
    none) and `size` the stored JPEG's (after orientation and --max-side), what a label map must follow.
    """

    jpg: bytes
    width: int
    height: int
    actions: tuple[str, ...]
    orientation: int = 1
    size: tuple[int, int] = (0, 0)


class ShardPlan(NamedTuple):
    """The candidates of one shard, in their shuffled order, with their global positions."""

    split: str
    name: str
    start: int
    items: list[Candidate]


# --------------------------------------------------------------------------------------------
# One image


def convert_image(data: bytes, max_side: int = 0, quality: int = 90, max_pixels: int | None = None) -> Converted:
    """Fully decode `data` and return RGB baseline JPEG bytes (the original ones when they already are).

    `max_pixels` (default: Pillow's MAX_IMAGE_PIXELS) bounds the pixels decoded. It replaces
    Pillow's own bomb guard, which would refuse a huge JPEG before `draft` could decode it
    at 1/2..1/8 scale: a JPEG above the limit is admitted when --max-side lets it be decoded
    reduced within the limit. Other formats cannot be decoded reduced, so their full size
    must be within the limit. Raises SkipImage with the reason for anything not decoded completely.
    """
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS
    if not data:
        raise SkipImage("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's bomb/EXIF warnings: decided explicitly below
        try:
            with _pillow_bomb_guard_off():  # reading the header allocates no pixels; the limit is checked below
                im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise SkipImage(_unidentified(data)) from None
        except Exception as err:  # Pillow raises many types on malformed headers
            raise SkipImage(_missing_codec_in(err) or f"unreadable image header: {_describe(err)}") from None
        width, height = im.size
        fmt = im.format or "unknown"
        actions: list[str] = []
        try:
            target = _fit(width, height, max_side)
            if target is not None and fmt == "JPEG":
                im.draft(im.mode, target)  # decode at 1/2, 1/4 or 1/8 scale when that is still >= target
            if im.size[0] * im.size[1] > max_pixels:
                raise SkipImage(_bomb_reason(width, height, fmt, max_pixels))
            im.load()  # the full decode: truncated or corrupt data fails here
            orientation = _orientation(im, actions)
            if orientation in range(2, 9):
                ImageOps.exif_transpose(im, in_place=True)
                actions.append("exif-rotated")
            rgb = _to_rgb(im, actions)
        except SkipImage:
            raise
        except Image.DecompressionBombError as err:
            raise SkipImage(f"decompression bomb: {err}") from None
        except Exception as err:
            raise SkipImage(_missing_codec_in(err) or f"corrupt or truncated: {_describe(err)}") from None
    if target is not None:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        actions.append("resized")
    if fmt != "JPEG":
        actions.append(fmt.lower())
    else:
        frame = _jpeg_frame_marker(data)
        if frame == 0xC2 or im.info.get("progressive"):
            actions.append("progressive")
        elif frame != 0xC0:
            actions.append("non-baseline")
        elif not data.endswith(b"\xff\xd9"):
            actions.append("jpeg-structure")  # no end-of-image marker last (trailing bytes or cut short)
    applied = orientation if orientation in range(2, 9) else 1
    if not actions:
        return Converted(data, width, height, (), applied, (width, height))
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=quality)  # baseline; no EXIF/ICC copied, so orientation is gone
    return Converted(buffer.getvalue(), width, height, tuple(actions), applied, rgb.size)


@contextlib.contextmanager
def _pillow_bomb_guard_off() -> Iterator[None]:
    """Pillow's open-time DecompressionBombError off for one open (shard workers are single-threaded)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _unidentified(data: bytes) -> str:
    """Why Pillow recognised no format: a codec this build lacks (WebP is then unrecognised) or not an image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and not features.check("webp"):
        return _codec_reason("webp")
    return "not an image (unrecognised format)"


def _missing_codec_in(err: BaseException) -> str | None:
    """The skip reason when `err` is Pillow saying a decoder was not built in (e.g. libtiff), else None."""
    match = _MISSING_DECODER.search(str(err))
    return _codec_reason(match.group(1)) if match else None


def _codec_reason(decoder: str) -> str:
    name, package = CODECS.get(decoder, (decoder, f"the {decoder} headers"))
    return (f"needs the {name} codec, which this Pillow-SIMD build lacks (run `make setup`: it installs {package} "
            "where it can and rebuilds Pillow-SIMD with it)")


def _bomb_reason(width: int, height: int, fmt: str, max_pixels: int) -> str:
    """Why an image above the pixel limit is refused, and the --max-side that would admit it, if any."""
    head = f"decompression bomb: {width}x{height} pixels exceed the limit of {max_pixels}"
    if fmt != "JPEG":
        return f"{head}; only a JPEG can be decoded reduced (--max-side), not a {fmt}"
    admitting = _max_side_admitting(width, height, max_pixels)
    if admitting is None:
        return f"{head}, even decoded at 1/{JPEG_DRAFT_SCALES[0]} scale"
    return f"{head}; --max-side {admitting} (or smaller) would admit it, decoded at reduced size"


def _max_side_admitting(width: int, height: int, max_pixels: int) -> int | None:
    """The largest --max-side of the form longest//k whose draft decode (as Image.draft does it) fits."""
    longest = max(width, height)
    for reduction in JPEG_DRAFT_SCALES[-2::-1]:  # 2, 4, 8
        max_side = longest // reduction
        if max_side < 16:
            break
        if _draft_pixels(width, height, _fit(width, height, max_side)) <= max_pixels:
            return max_side
    return None


def _draft_pixels(width: int, height: int, target: tuple[int, int]) -> int:
    """Pixels JpegImagePlugin.draft decodes for `target`: the largest reduction that stays >= target."""
    scale = min(width // target[0], height // target[1])
    reduction = next(r for r in JPEG_DRAFT_SCALES if scale >= r)
    return -(-width // reduction) * -(-height // reduction)


def _fit(width: int, height: int, max_side: int) -> tuple[int, int] | None:
    """The size within max_side (aspect kept), or None when no downscale is needed."""
    longest = max(width, height)
    if not max_side or longest <= max_side:
        return None
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _orientation(im: Image.Image, actions: list[str]) -> int:
    """EXIF orientation (1 when absent); unparsable EXIF forces a re-encode that drops it."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        actions.append("bad-exif")
        return 1
    if not isinstance(value, int) or not 1 <= value <= 8:
        actions.append("bad-exif")
        return 1
    return value


def _to_rgb(im: Image.Image, actions: list[str]) -> Image.Image:
    """8-bit RGB, whatever the decoded mode; alpha is composited on white (what a viewer shows)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "CMYK":
        actions.append("cmyk")
        return im.convert("RGB")
    if mode in ("1", "L"):
        actions.append("grayscale")
        return im.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        actions.append("16-bit" if mode != "F" else "float")
        return Image.fromarray(_to_uint8(np.asarray(im), mode)).convert("RGB")
    if mode == "P":
        actions.append("palette")
        if "transparency" not in im.info:
            return im.convert("RGB")
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        actions.append("alpha")
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    actions.append(mode.lower().replace(";", ""))  # YCbCr, LAB, HSV, ...
    return im.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16/32-bit integer or float gray levels to 8 bits (Pillow's convert would clip)."""
    if mode == "F":
        values = values * 255.0 if values.size and float(values.max()) <= 1.0 else values
    elif mode.startswith("I;16") or (values.size and int(values.max()) > 255):
        values = values.astype(np.int64) >> 8
    return np.clip(values, 0, 255).astype(np.uint8)


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The SOFn marker byte of a JPEG (0xC0 baseline, 0xC2 progressive, ...), None if not found."""
    pos = 2
    end = len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF_MARKERS:
            return marker
        if marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker == 0xDA or marker == 0xD9:  # scan data or end before any frame header
            return None
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return None


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _convert_file(job: tuple[str, int, int, int], within: str | None = None) -> tuple[Converted | None, str]:
    """Worker: read and convert one file; returns (result, "") or (None, reason)."""
    path, max_side, quality, max_pixels = job
    try:
        return convert_image(_read_input(path, within), max_side, quality, max_pixels), ""
    except SkipImage as err:
        return None, str(err)
    except MemoryError:
        return None, "decompression bomb: out of memory while decoding"


# --------------------------------------------------------------------------------------------
# One label map


class ConvertedMask(NamedTuple):
    """A validated label map: the PNG bytes to store and what was done to get them ("mask-kept": nothing)."""

    png: bytes
    actions: tuple[str, ...]


_TRANSPOSED = frozenset((5, 6, 7, 8))  # EXIF orientations that swap width and height


def convert_mask(data: bytes, image: Converted, spec: SegSpec, max_pixels: int | None = None) -> ConvertedMask:
    """Check a label map against its (converted) image and return the PNG to store; raises SkipImage.

    Decoded fully, like an image; single-channel (L, palette indices, 1-bit, 16-bit gray); turned by
    its image's EXIF orientation when it carries the same one, refused when they differ; the size of
    the image as displayed; only classes or unlabelled values; resized NEAREST when --max-side
    resized the image. Re-encoded (losslessly) only when one of those changed it.
    """
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS
    if not data:
        raise SkipImage("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _pillow_bomb_guard_off():
                im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise SkipImage("not an image (unrecognised format)") from None
        except Exception as err:
            raise SkipImage(f"unreadable header: {_describe(err)}") from None
        if im.format != "PNG":
            raise SkipImage(f"a {im.format} file: label maps must be PNGs (lossless; a JPEG's edges change labels)")
        if im.size[0] * im.size[1] > max_pixels:
            raise SkipImage(f"decompression bomb: {im.size[0]}x{im.size[1]} pixels exceed the limit of {max_pixels}")
        try:
            im.load()
            orientation = _mask_orientation(im)
        except Exception as err:
            raise SkipImage(f"corrupt or truncated: {_describe(err)}") from None
    mode = im.mode
    if mode not in ("L", "P", "1", "I") and not mode.startswith("I;16"):
        raise SkipImage(f"a {mode} image, not a label map: give single-channel PNGs (8-bit gray or palette "
                        "indices, or 16-bit gray) of label values, not colour-coded masks")
    actions: list[str] = []
    if orientation != image.orientation:
        raise SkipImage(f"EXIF orientation {orientation} differs from its image's {image.orientation}: which pixel "
                        "grid the labels follow is ambiguous; apply or strip the orientation in both files")
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
        actions.append("mask-exif-rotated")
    expected = (image.height, image.width) if image.orientation in _TRANSPOSED else (image.width, image.height)
    if im.size != expected:
        hint = " (it matches the image's pixel grid before its EXIF rotation)" if im.size == expected[::-1] else ""
        raise SkipImage(f"size {im.size[0]}x{im.size[1]} differs from its image's {expected[0]}x{expected[1]}{hint}")
    if mode == "1" or mode == "I":
        values = np.asarray(im).astype(np.int64)
        if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
            raise SkipImage(f"labels out of range: values {int(values.min())}..{int(values.max())} do not fit 16 bits")
        values = values.astype(np.uint16 if values.size and int(values.max()) > 255 else np.uint8)
        actions.append("mask-re-encoded")
    else:
        values = np.asarray(im).astype(np.uint16 if mode.startswith("I;16") else np.uint8)
    bad = spec.out_of_range(values)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        raise SkipImage(f"labels out of range: {shown} (the dataset has {spec.describe()})")
    if image.size != im.size:  # --max-side resized the image: the label map follows, nearest
        values = np.asarray(Image.fromarray(values).resize(image.size, Image.Resampling.NEAREST))
        actions.append("mask-resized")
    if not actions:
        return ConvertedMask(data, ("mask-kept",))
    return ConvertedMask(encode_label_map(values), tuple(actions))


def _mask_orientation(im: Image.Image) -> int:
    """A label map's EXIF orientation (1 when absent or unreadable: a PNG's eXIf chunk is rare)."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _convert_mask_file(path: str, rel: str, image: Converted, spec: SegSpec,
                       max_pixels: int) -> tuple[ConvertedMask | None, str]:
    """Worker: read and check one label map; returns (result, "") or (None, reason naming the label map)."""
    try:
        return convert_mask(_read_input(path), image, spec, max_pixels), ""
    except SkipImage as err:
        return None, f"label map {rel}: {err}"
    except MemoryError:
        return None, f"label map {rel}: decompression bomb: out of memory while decoding"


def _read_input(path: str, within: str | None = None) -> bytes:
    """The bytes of one input file; raises SkipImage for anything that is not a readable regular file.

    What is not a regular file (FIFO, socket, device, folder) is refused from its stat, never
    opened: opening a FIFO blocks until a writer appears, reading a device may never end.
    `within` (a resolved folder): refuse, unread, a path that resolves outside it.
    """
    if within is not None and not _inside(os.path.realpath(path), within):
        raise SkipImage("resolves outside SOURCE (through a symlink): not read")
    try:
        kind = _not_regular(os.stat(path).st_mode)
        if kind is not None:
            raise SkipImage(kind)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            kind = _not_regular(os.fstat(fd).st_mode)  # replaced between stat and open
            if kind is not None:
                raise SkipImage(kind)
            return f.read()
    except FileNotFoundError:
        raise SkipImage("broken symlink (its target does not exist)" if os.path.islink(path) else "file not found") from None
    except OSError as err:
        raise SkipImage(f"unreadable file: {err.strerror or _describe(err)}") from None


def _not_regular(mode: int) -> str | None:
    """Why a file of this st_mode is not an input (None: a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a regular file: not read"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file: not read"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file, not a regular file: not read"
    return "not a regular file: not read"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# --------------------------------------------------------------------------------------------
# Finding the inputs


class Listing(NamedTuple):
    """What discovery found: class names, the candidates of each split and, per split, what it
    refused while listing (skipped.jsonl records: path, maybe path_bytes, reason); for segmentation
    data, how its label maps are read."""

    classes: list[str]
    candidates: dict[str, list[Candidate]]
    refused: dict[str, list[dict]]
    segmentation: Optional[SegSpec] = None


def discover_imagenet(source: Path) -> Listing:
    """SOURCE/{train,val}/<class>/** -> sorted class names, the candidates and the refused entries of each split."""
    split_dirs = {split: source / split for split in IMAGENET_SPLITS if (source / split).is_dir()}
    if not split_dirs:
        raise UserError(
            f"{source} has no train/ or val/ folder; expected SOURCE/train/<class>/*.JPEG "
            "(or give list files with --list)"
        )
    per_split: dict[str, list[tuple[str, str | None]]] = {}
    refused: dict[str, list[dict]] = {}
    class_names: set[str] = set()
    for split, split_dir in split_dirs.items():
        files: list[tuple[str, str | None]] = []
        refused[split] = []
        classes_here = 0
        entries, error = _list_dir(split_dir)
        if error is not None:
            refused[split].append(_skip_record(split, error))
        for entry in entries:
            rel = f"{split}/{entry.name}"
            if entry.name.startswith("."):
                refused[split].append(_skip_record(rel, _hidden(entry)))
            elif _is_dir(entry):
                found = _walk(rel, entry.path)
                if not _is_text(entry.name):
                    refused[split].extend(_skip_record(path, reason or BAD_CLASS_NAME) for path, reason in found)
                    continue
                classes_here += 1
                class_names.add(entry.name)
                for path, reason in found:
                    if reason is None:
                        files.append((path, entry.name))
                    else:
                        refused[split].append(_skip_record(path, reason))
            elif entry.is_file():
                files.append((rel, None))
            else:
                refused[split].append(_skip_record(rel, NOT_IN_A_CLASS))
        if files and not classes_here:
            raise UserError(
                f"{split_dir} holds files but no class folders; sort them into {split}/<class>/ "
                f"or describe them with --list {split}=FILE"
            )
        per_split[split] = files
    classes = sorted(class_names)
    index = {name: i for i, name in enumerate(classes)}
    splits = {
        split: [Candidate(rel, index[name] if name is not None else -1) for rel, name in files]
        for split, files in per_split.items()
    }
    return Listing(classes, splits, refused)


def _walk(rel: str, folder: str) -> Iterator[tuple[str, str | None]]:
    """(path relative to SOURCE, None) for each file under `folder` that may be an input, (path,
    reason) for each entry refused while listing: hidden ones, symlinks to folders (not followed:
    no cycles), a folder that cannot be listed (one entry). Symlinks to files are inputs."""
    entries, error = _list_dir(folder)
    if error is not None:
        yield rel, error
        return
    for entry in entries:
        path = f"{rel}/{entry.name}"
        if entry.name.startswith("."):
            yield path, _hidden(entry)
        elif _is_dir(entry, follow_symlinks=False):
            yield from _walk(path, entry.path)
        elif entry.is_symlink() and _is_dir(entry):
            yield path, "a symlink to a folder (not followed)"
        else:
            yield path, None  # what it is (regular, FIFO, device, broken link) is settled when it is read


def _list_dir(folder: str | Path) -> tuple[list[os.DirEntry], str | None]:
    """The entries of `folder` sorted by name (the file system's order cannot matter), or the reason it cannot be listed."""
    try:
        with os.scandir(folder) as listing:
            return sorted(listing, key=lambda e: e.name), None
    except OSError as err:
        return [], f"folder cannot be listed: {err.strerror or _describe(err)}"


def _is_dir(entry: os.DirEntry, follow_symlinks: bool = True) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow_symlinks)
    except OSError:
        return False


def _hidden(entry: os.DirEntry) -> str:
    return "hidden folder (not searched)" if _is_dir(entry, follow_symlinks=False) else "hidden file"


def _is_text(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (os functions give them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path_fields(path: str) -> dict[str, str]:
    """{"path": text} for a record; a name that is not valid UTF-8 gets U+FFFD for the bad bytes in
    `path` and its original bytes, base64, in `path_bytes`, so that it can still be found."""
    if _is_text(path):
        return {"path": path}
    raw = os.fsencode(path)
    return {"path": raw.decode("utf-8", "replace"), "path_bytes": base64.b64encode(raw).decode("ascii")}


def _skip_record(path: str, reason: str) -> dict[str, str]:
    """One skipped.jsonl line."""
    return {**_path_fields(path), "reason": reason}


def discover_lists(source: Path, lists: dict[str, Path]) -> Listing:
    """List files of `relative/path class_index` lines -> class names and candidates per split.

    The given indices stand. A class is named after the one folder its files live in
    when that is unambiguous (e.g. ImageNet synsets), else after its index. Nothing is
    refused while listing: what a listed path is (and whether it resolves inside SOURCE) is
    settled when it is read.
    """
    splits: dict[str, list[Candidate]] = {}
    for split, list_file in lists.items():
        list_file = Path(list_file)
        if not list_file.is_file():
            raise UserError(f"--list {split}={list_file}: no such file")
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--list {split}={list_file}: cannot read it ({_describe(err)})") from None
        candidates = []
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{list_file}:{number}"
            fields = text.rsplit(None, 1)
            if len(fields) != 2:
                raise UserError(f"{where}: expected `relative/path class_index`, got {text!r}")
            path, label = fields
            if not label.isdigit():
                raise UserError(f"{where}: class index {label!r} is not a non-negative integer")
            rel = PurePosixPath(path)
            if rel.is_absolute() or ".." in rel.parts or path.startswith("~"):
                raise UserError(f"{where}: path {path!r} must be relative to SOURCE, without '..'")
            candidates.append(Candidate(rel.as_posix(), int(label)))
        if not candidates:
            raise UserError(f"--list {split}={list_file}: no `relative/path class_index` lines in it")
        probe = candidates[: min(len(candidates), 100)]
        if not any((source / c.path).exists() for c in probe):
            raise UserError(
                f"none of the first {len(probe)} paths of {list_file} exists under {source}; "
                "is SOURCE the folder the list's paths are relative to?"
            )
        splits[split] = candidates
    num_classes = 1 + max(c.label for candidates in splits.values() for c in candidates)
    folders: dict[int, set[str]] = {}
    for candidates in splits.values():
        for c in candidates:
            parent = PurePosixPath(c.path).parent.name
            if parent:
                folders.setdefault(c.label, set()).add(parent)
    names = [next(iter(folders[i])) if len(folders.get(i, ())) == 1 else str(i) for i in range(num_classes)]
    if len(set(names)) != len(names):
        names = [str(i) for i in range(num_classes)]
    return Listing(names, splits, {split: [] for split in splits})


class SegLayout(NamedTuple):
    """Where a segmentation SOURCE keeps its images and label maps (folders relative to SOURCE, POSIX)."""

    name: str  # "ade20k" | "masks"
    images: str  # the image root ("" = SOURCE itself)
    masks: str  # the label-map root
    splits: dict[str, str]  # our split -> its folder under both roots
    spec: SegSpec


def detect_layout(source: Path, layout: str = "auto", ignore_index: int | None = None,
                  reduce_zero_label: bool | None = None) -> SegLayout | None:
    """The segmentation layout of SOURCE, or None for classification data (see the module docstring).

    `ignore_index` and `reduce_zero_label` override the layout's own convention (ADE20K: 255 and true,
    the generic layout: 255 and false).
    """
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if ignore_index is not None and not 0 <= ignore_index <= 65535:
        raise UserError(f"--ignore-index must be in 0..65535 (a stored label value), got {ignore_index}")
    if layout == "imagenet":
        return None
    ade = next((root for root in (ADE20K_ROOT, "") if _is_ade20k(source / root)), None)
    if layout in ("auto", "ade20k") and ade is not None:
        splits = {ours: theirs for ours, theirs in ADE20K_SPLITS.items() if (source / ade / "images" / theirs).is_dir()}
        spec = SegSpec(ADE20K_CLASSES, DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index,
                       True if reduce_zero_label is None else reduce_zero_label, image_classes=False)
        return SegLayout("ade20k", _join(ade, "images"), _join(ade, "annotations"), splits, spec)
    if layout == "ade20k":
        raise UserError(f"{source} is not ADE20K's layout: expected [{ADE20K_ROOT}/]images/training (or "
                        "validation) with annotations/ beside it")
    if (source / MASKS_ROOT).is_dir():
        images = "images" if (source / "images").is_dir() else ""
        splits = {}
        for split in IMAGENET_SPLITS:
            folder = next((f for f in (split, ADE20K_SPLITS[split]) if (source / images / f).is_dir()
                           or (source / MASKS_ROOT / f).is_dir()), None)
            if folder is not None:
                splits[split] = folder
        if not splits:
            raise UserError(f"{source / MASKS_ROOT} has no train/ or val/ folder: expected masks/{{train,val}}/...")
        spec = SegSpec(_read_classes(source / CLASSES_FILE),
                       DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index, bool(reduce_zero_label))
        return SegLayout("masks", images, MASKS_ROOT, splits, spec)
    if layout == "masks":
        raise UserError(f"{source} has no {MASKS_ROOT}/ folder: expected masks/{{train,val}}/... beside the images")
    return None


def _is_ade20k(root: Path) -> bool:
    return (root / "annotations").is_dir() and any((root / "images" / s).is_dir() for s in ADE20K_SPLITS.values())


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _read_classes(path: Path) -> tuple[str, ...]:
    """classes.txt: one class name per line, line i (from 0) naming label i; blank lines only at the end."""
    if not path.is_file():
        raise UserError(f"{path.parent} has label maps ({MASKS_ROOT}/) but no {CLASSES_FILE}: list the class names "
                        "in it, one per line, line i (from 0) naming label value i")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it ({_describe(err)})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = tuple(line.strip() for line in lines)
    blank = next((number for number, name in enumerate(names, 1) if not name), None)
    if blank is not None:
        raise UserError(f"{path}:{blank}: a blank class name (line i names label i-1: every line needs a name)")
    if not 1 <= len(names) <= MAX_CLASSES:
        raise UserError(f"{path}: {len(names)} classes; need 1..{MAX_CLASSES}")
    return names


def discover_segmentation(source: Path, layout: SegLayout) -> Listing:
    """Images of each split with the label map each must have; label maps without an image are refused.

    An image `IMAGES/{split}/REL` has the label map `MASKS/{split}/REL` with the suffix `.png`. Its
    image class is the first folder of REL when every image lies in a folder (ImageNet-style), else
    there are no image classes (class 0, `none`).
    """
    files: dict[str, list[tuple[str, str, str]]] = {}  # split -> (image path, folder, mask path)
    refused: dict[str, list[dict]] = {}
    for split, folder in layout.splits.items():
        image_rel, mask_rel = _join(layout.images, folder), _join(layout.masks, folder)
        refused[split], files[split] = [], []
        claimed: dict[str, str] = {}  # mask path -> the image that has it
        if (source / image_rel).is_dir():
            for path, reason in _walk(image_rel, str(source / image_rel)):
                if reason is not None:
                    refused[split].append(_skip_record(path, reason))
                    continue
                inner = PurePosixPath(path[len(image_rel) + 1:])
                mask = f"{mask_rel}/{inner.with_suffix('.png').as_posix()}"
                if mask in claimed:
                    refused[split].append(_skip_record(path, f"its label map name {mask} is also that of "
                                                             f"{claimed[mask]}: rename one of the two images"))
                    continue
                claimed[mask] = path
                files[split].append((path, inner.parts[0] if len(inner.parts) > 1 else "", mask))
        if (source / mask_rel).is_dir():
            for path, reason in _walk(mask_rel, str(source / mask_rel)):
                if reason is not None:
                    refused[split].append(_skip_record(path, reason))
                elif path not in claimed:
                    refused[split].append(_skip_record(path, f"a label map without an image (no {image_rel}/"
                                                             f"{PurePosixPath(path[len(mask_rel) + 1:]).stem}.*)"))
    listed = [entry for entries in files.values() for entry in entries]
    with_classes = bool(listed) and all(folder for _, folder, _ in listed)
    if with_classes:
        good = {folder for _, folder, _ in listed if _is_text(folder)}
        classes = sorted(good)
    else:
        classes = [NO_IMAGE_CLASS]
    index = {name: i for i, name in enumerate(classes)}
    candidates: dict[str, list[Candidate]] = {}
    for split, entries in files.items():
        candidates[split] = []
        for path, folder, mask in entries:
            if with_classes and folder not in index:
                refused[split].append(_skip_record(path, BAD_CLASS_NAME))
            else:
                candidates[split].append(Candidate(path, index[folder] if with_classes else 0, mask))
    return Listing(classes, candidates, refused, dataclasses.replace(layout.spec, image_classes=with_classes))


# --------------------------------------------------------------------------------------------
# Writing shards


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through (one pass, no re-read)."""

    def __init__(self, file: io.BufferedWriter):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.file.flush()


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError while writing `path` (full disk, read-only, permissions) as one line naming it."""
    try:
        yield
    except OSError as err:
        raise output_error(err, path) from None


class _ShardWriter:
    """One shard: a tar (webdataset's TarWriter) and its DALI index, both under temporary names
    until commit() fsyncs and renames them. An OSError is an OutputError naming the shard."""

    def __init__(self, out: Path, name: str):
        import webdataset  # imported here: it pulls in torch, which worker processes do not need

        self.out = out
        self.name = name
        self.tar_path, self.index_path = out / f"{name}.tar", out / f"{name}.idx"
        self.tmp_tar, self.tmp_index = temporary_path(self.tar_path), temporary_path(self.index_path)
        with _writing(self.tar_path):
            self.file = open(self.tmp_tar, "wb")
        self.hashing = _HashingWriter(self.file)
        self.tar = webdataset.TarWriter(
            self.hashing, encoder=False, mtime=TAR_MTIME, user="droppos", group="droppos", mode=0o444
        )
        self.index_lines: list[str] = []

    def write(self, key: str, components: dict[str, bytes]) -> None:
        """Add one sample and its index line (offsets of each component's data in the tar)."""
        stream = self.tar.tarstream
        position = stream.offset
        with _writing(self.tar_path):
            self.tar.write({"__key__": key, **components})
        fields = []
        for ext in sorted(components):  # TarWriter writes components in sorted order, one USTAR header each
            size = len(components[ext])
            data_offset = position + TAR_BLOCK
            fields += [ext, str(data_offset), str(size), f"{key}.{ext}"]
            position = data_offset + -(-size // TAR_BLOCK) * TAR_BLOCK
        if position != stream.offset:
            raise RuntimeError(f"{self.name}: tar layout differs from the index being written")
        self.index_lines.append(" ".join(fields))

    def commit(self) -> dict:
        """Finish, fsync and rename both files; returns the manifest entry (None-free)."""
        with _writing(self.tar_path):
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        index_bytes = (f"{INDEX_VERSION} {len(self.index_lines)}\n"
                       + "".join(line + "\n" for line in self.index_lines)).encode("ascii")
        write_bytes_atomic(self.index_path, index_bytes)  # the index first: a tar never stands without it
        with _writing(self.tar_path):
            os.replace(self.tmp_tar, self.tar_path)
        fsync_dir(self.out)
        return {
            "tar": self.tar_path.name,
            "index": self.index_path.name,
            "num_samples": len(self.index_lines),
            "bytes": self.hashing.size,
            "sha256": self.hashing.sha256.hexdigest(),
            "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
        }

    def abort(self) -> None:
        """Drop the temporary files (an empty shard, or an interrupted or failed one); never raises an OSError."""
        if not self.file.closed:
            with contextlib.suppress(Exception):  # flush the tar stream into the file before it closes
                self.tar.close()
            with contextlib.suppress(OSError):  # a full disk fails the final flush too
                self.file.close()
        for tmp in (self.tmp_tar, self.tmp_index):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _sample_components(label: int, class_name: str, path: str, converted: Converted,
                       mask: tuple[str, ConvertedMask] | None = None) -> dict[str, bytes]:
    """jpg, cls (ASCII), lbl (int32 little-endian: fixed width, what DALI batches) and json (provenance);
    with a label map (its path, its checked PNG), seg.png too and the label map's path in json."""
    meta = {**_path_fields(path), "class": class_name, "width": converted.width, "height": converted.height}
    if mask is not None:
        meta["mask"] = _path_fields(mask[0])["path"]
    components = {
        "jpg": converted.jpg,
        "cls": str(label).encode("ascii"),
        "lbl": struct.pack("<i", label),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }
    if mask is not None:
        components[MASK_COMPONENT] = mask[1].png
    return components


def _sample_key(split: str, position: int) -> str:
    return f"{split}_{position:09d}"  # no dot: webdataset and DALI split keys at the first dot


# --------------------------------------------------------------------------------------------
# Progress on a terminal (rich) or as periodic plain lines (logs)


class _Progress:
    """A rich bar on stderr when it is a terminal, else one plain line every LOG_EVERY_S seconds."""

    def __init__(self, label: str, total: int, unit: str = "images"):
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.started = self.last_log = time.monotonic()
        self.bar = None
        if sys.stderr.isatty() and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, rate="")

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{self._rate(now):,.0f} {self.unit}/s")
        elif now - self.last_log >= LOG_EVERY_S:
            self.last_log = now
            self._line(now)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.total and self.done and time.monotonic() - self.started >= LOG_EVERY_S:
            self._line(time.monotonic())

    def _rate(self, now: float) -> float:
        return self.done / max(now - self.started, 1e-9)

    def _line(self, now: float) -> None:
        rate = self._rate(now)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(
            f"{self.label}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.1f}%), "
            f"{rate:,.0f} {self.unit}/s, eta {eta:,.0f} s",
            file=sys.stderr, flush=True,
        )


# --------------------------------------------------------------------------------------------
# The command


def run(
    source: Path | None,
    out: Path,
    sample: bool = False,
    lists: dict[str, Path] | None = None,
    seed: int = 0,
    workers: int = 1,
    max_side: int = 0,
    quality: int = 90,
    shard_size: int = 1000,
    sample_options: dict | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    layout: str = "auto",
    ignore_index: int | None = None,
    reduce_zero_label: bool | None = None,
) -> dict:
    """Shard SOURCE (or the built-in sample data) into OUT; resumes a previous run; returns the manifest.

    `layout` says what SOURCE holds (auto: recognised; see `detect_layout`); `ignore_index` and
    `reduce_zero_label` override a segmentation layout's convention. The sample data comes with its
    label maps (`sample_options` may say `masks=False`). Holds OUT's lock for the whole run: a second
    `shard` on the same OUT stops with one line.
    """
    lists = dict(lists or {})
    _check_options(workers=workers, max_side=max_side, quality=quality, shard_size=shard_size, max_pixels=max_pixels)
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out} is a file; give a directory (it is created when missing)")
    if not sample:
        if source is None:
            raise UserError("give SOURCE (or --sample)")
        source = _checked_source(Path(source).absolute(), out)
    with OutputLock(out, "shard"):
        if sample:
            from droppos import sample_data

            source = out / "sample-source"
            print(f"generating the sample data in {source}", file=sys.stderr, flush=True)
            sample_data.generate(source, workers=workers, **{"masks": True, **(sample_options or {})})
            source = _checked_source(source, out)
        seg = None if lists else detect_layout(source, layout, ignore_index, reduce_zero_label)
        if lists and layout not in ("auto", "imagenet"):
            raise UserError(f"--list describes classification data; it does not combine with --layout {layout}")
        if seg is not None:
            _check_out_outside(out, [source / _join(root, folder) for folder in seg.splits.values()
                                     for root in (seg.images, seg.masks)])
        return _run_locked(source, out, lists, seed, workers, max_side, quality, shard_size, max_pixels, sample, seg)


def _checked_source(source: Path, out: Path) -> Path:
    """SOURCE exists, is not empty, and OUT is neither SOURCE nor inside its splits (compared resolved:
    a symlink must not get OUT into what is being read)."""
    if not source.is_dir():
        raise UserError(f"SOURCE {source} does not exist or is not a directory")
    try:
        with os.scandir(source) as listing:
            empty = not any(listing)
    except OSError as err:
        raise UserError(f"SOURCE {source} cannot be listed: {err.strerror}") from None
    if empty:
        raise UserError(f"SOURCE {source} is empty")
    real_out = out.resolve()
    split_dirs = [(source / split).resolve() for split in IMAGENET_SPLITS]
    if real_out == source.resolve() or any(real_out == d or real_out.is_relative_to(d) for d in split_dirs):
        where = "" if real_out == out else f" (resolved: {real_out})"
        raise UserError(f"OUT {out}{where} must not be SOURCE or lie inside its train/ or val/ folder")
    return source


def _check_out_outside(out: Path, folders: list[Path]) -> None:
    """OUT lies in none of the folders a segmentation layout reads (compared resolved)."""
    real_out = out.resolve()
    for folder in folders:
        real = folder.resolve()
        if real_out == real or real_out.is_relative_to(real):
            raise UserError(f"OUT {out} must not lie inside {folder}, which is read")


def _run_locked(
    source: Path, out: Path, lists: dict[str, Path], seed: int, workers: int, max_side: int, quality: int,
    shard_size: int, max_pixels: int, sample: bool, seg: SegLayout | None = None,
) -> dict:
    """The run, with OUT locked and SOURCE checked."""
    if seg is not None:
        listing = discover_segmentation(source, seg)
    else:
        listing = discover_lists(source, lists) if lists else discover_imagenet(source)
    found = listing.candidates
    splits = [s for s in _split_order({*found, *listing.refused}) if found.get(s) or listing.refused.get(s)]
    total_found = sum(len(found.get(s, ())) + len(listing.refused.get(s, ())) for s in splits)
    if total_found == 0:
        if seg is not None:
            raise UserError(f"SOURCE {source} has no images under {_join(seg.images, '{train,val}')} ({seg.name} layout)")
        raise UserError(f"SOURCE {source} has no files in its class folders (expected SOURCE/train/<class>/*.JPEG)")

    options = {
        "source": _path_fields(str(source))["path"],
        "mode": seg.name if seg is not None else "list" if lists else "imagenet",
        "lists": {split: _path_fields(str(Path(path).absolute()))["path"] for split, path in lists.items()},
        "sample": sample,
        "seed": seed,
        "shard_size": shard_size,
        "max_side": max_side,
        "quality": quality,
        "max_pixels": max_pixels,
    }
    planned = [s for s in splits if found.get(s)]
    plans = _plan_shards(found, planned, seed, shard_size)
    options["fingerprint"] = _fingerprint(listing.classes, found, planned, options, listing.segmentation)

    records = _resume(out, options["fingerprint"])
    todo = [plan for plan in plans if plan.name not in records]
    if len(todo) < len(plans):
        print(f"resuming: {len(plans) - len(todo)} of {len(plans)} shards already complete and verified",
              file=sys.stderr, flush=True)
    within = os.path.realpath(source) if lists else None  # a list's entries must stay inside SOURCE
    if todo:
        _write_shards(source, out, todo, listing.classes, options, workers, records, within, listing.segmentation)

    manifest = _finish(out, plans, listing, splits, options, records)
    _print_tally(out, manifest)
    return manifest


def _check_options(**values: int) -> None:
    """The programmatic twin of the CLI's option checks (run() is also called from Python)."""
    if values["workers"] < 1:
        raise UserError(f"--workers must be >= 1, got {values['workers']}")
    if values["shard_size"] < 1:
        raise UserError(f"--shard-size must be >= 1, got {values['shard_size']}")
    if not 1 <= values["quality"] <= 100:
        raise UserError(f"--quality must be in 1..100, got {values['quality']}")
    if values["max_side"] != 0 and values["max_side"] < 16:
        raise UserError(f"--max-side must be 0 (keep size) or >= 16, got {values['max_side']}")
    if values["max_pixels"] < 1:
        raise UserError(f"max_pixels must be >= 1, got {values['max_pixels']}")


def _split_order(splits: Iterable[str]) -> list[str]:
    return sorted(splits, key=lambda s: (s not in IMAGENET_SPLITS, IMAGENET_SPLITS.index(s) if s in IMAGENET_SPLITS else 0, s))


def _plan_shards(found: dict[str, list[Candidate]], splits: list[str], seed: int, shard_size: int) -> list[ShardPlan]:
    """Sort (so the file system's listing order cannot matter), shuffle by seed, cut into shards."""
    plans = []
    for split in splits:
        order = sorted(found[split])
        random.Random(f"droppos-shard:{seed}:{split}").shuffle(order)
        for number, start in enumerate(range(0, len(order), shard_size)):
            plans.append(ShardPlan(split, f"{split}-{number:06d}", start, order[start : start + shard_size]))
    return plans


def _fingerprint(classes: list[str], found: dict[str, list[Candidate]], splits: list[str], options: dict,
                 seg: SegSpec | None = None) -> str:
    """What the shards depend on: the input listing, the classes and the options that change bytes
    (for segmentation data also the label maps' paths and convention; classification data hashes as before)."""
    digest = hashlib.sha256()
    relevant = {k: options[k] for k in ("mode", "seed", "shard_size", "max_side", "quality", "max_pixels")}
    digest.update(json.dumps({"format": FORMAT, "classes": classes, "options": relevant}, sort_keys=True).encode())
    if seg is not None:
        digest.update(json.dumps({"segmentation": seg.record()}, sort_keys=True).encode())
    for split in splits:
        digest.update(f"\n[{split}]\n".encode())
        for candidate in sorted(found[split]):
            mask = "" if candidate.mask is None else f"\t{candidate.mask}"
            digest.update(f"{candidate.path}\t{candidate.label}{mask}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _resume(out: Path, fingerprint: str) -> dict[str, dict]:
    """Shard records of a previous run on OUT whose files still match; refuses foreign datasets."""
    log = out / PROGRESS_LOG
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8")).get("options", {}).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous != fingerprint:
            raise UserError(
                f"OUT {out} already holds a dataset written from other input or options; "
                "give an empty directory or delete that one"
            )
    records: dict[str, dict] = {}
    if not log.is_file():
        return records
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise output_error(err, log, "read") from None
    try:
        header = json.loads(lines[0]) if lines else {}
    except ValueError:
        header = {}
    if header.get("fingerprint") != fingerprint:
        raise UserError(
            f"OUT {out} holds shards of an unfinished run from other input or options; "
            "re-run that command, or give an empty directory"
        )
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by an interruption: that shard is simply redone
        if isinstance(record, dict) and isinstance(record.get("name"), str):
            records[record["name"]] = record
    intact = {}
    for name, record in records.items():
        problem = _shard_problem(out, record)
        if problem is None:
            intact[name] = record
        else:
            print(f"rewriting {name}: {problem}", file=sys.stderr, flush=True)
    return intact


def _shard_problem(out: Path, record: dict) -> str | None:
    """Why a recorded shard cannot be reused (None: its tar has the recorded size and sha256, and
    its index the recorded sha256 and, entry by entry, the tar's real layout).

    A record from before index hashes were recorded gets `index_sha256` here, once its index
    is checked against the tar: that is how a re-run upgrades an older dataset in place,
    without rewriting a tar.
    """
    entry = record.get("entry")
    if entry is None:  # every candidate of that shard was skipped: nothing on disk to check
        return None
    try:
        tar, index = out / entry["tar"], out / entry["index"]
        if tar.stat().st_size != entry["bytes"]:
            return "its tar has another size than when it was written"
        scan = _scan_tar(tar)
        index_sha256 = file_sha256(index)
    except (KeyError, TypeError):
        return "its progress record is malformed"
    except (OSError, _BadShard) as err:
        return str(err) if isinstance(err, _BadShard) else f"cannot read it ({err.strerror})"
    if scan.sha256 != entry["sha256"]:
        return "its tar's sha256 differs from when it was written"
    if entry.get("index_sha256", index_sha256) != index_sha256:
        return f"{index.name}'s sha256 differs from when it was written"
    problem = _index_problem(index, scan.members)
    if problem is not None:
        return f"{index.name}: {problem}"
    entry["index_sha256"] = index_sha256
    return None


def _write_shards(
    source: Path, out: Path, todo: list[ShardPlan], classes: list[str], options: dict, workers: int,
    records: dict[str, dict], within: str | None, seg: SegSpec | None = None,
) -> None:
    """Write the shards of `todo`, one shard per task on `workers` processes, logging each when done.

    Shards, not images, are the unit of parallel work: the image bytes never cross a process
    boundary and the tar writing scales with the workers too. Called with OUT locked, so every
    temporary file in OUT is stale: they are removed before and after (a failed or stopped
    pool leaves its workers' temporaries behind).
    """
    import webdataset  # noqa: F401  (slow import: done once here, before forking and the progress clock)

    settings = (options["max_side"], options["quality"], options["max_pixels"])
    tasks = [(source, out, plan, classes, settings, within, seg) for plan in todo]
    progress = _Progress("shard", sum(len(plan.items) for plan in todo))
    log_path = out / PROGRESS_LOG
    _remove_temporaries(out)
    try:
        with _writing(log_path):
            log = _open_progress_log(log_path, options["fingerprint"])

        def record_done(record: dict) -> None:
            with _writing(log_path):
                log.write(json.dumps(record, ensure_ascii=False) + "\n")
                log.flush()
                os.fsync(log.fileno())
            records[record["name"]] = record

        try:
            if workers == 1 or len(tasks) == 1:
                for task in tasks:
                    record_done(_write_shard(task, on_image=progress.advance))
                return
            context = _pool_context()
            counter = context.Value("q", 0)
            with context.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(counter,)) as pool:
                pending = pool.imap_unordered(_write_shard, tasks)
                while True:
                    try:
                        record = pending.next(timeout=0.5)
                    except multiprocessing.TimeoutError:
                        progress.advance(counter.value - progress.done)
                        continue
                    except StopIteration:
                        break
                    record_done(record)
                    progress.advance(counter.value - progress.done)
        finally:
            with contextlib.suppress(OSError):
                log.close()
    finally:
        progress.close()
        _remove_temporaries(out)


def _open_progress_log(path: Path, fingerprint: str) -> io.TextIOWrapper:
    """The progress log for appending: created with its header line, or ended with a newline
    first when an interruption tore its last line (the next record must start a line)."""
    if not path.is_file():
        with open(path, "w", encoding="utf-8") as log:
            log.write(json.dumps({"format": FORMAT, "fingerprint": fingerprint}) + "\n")
            log.flush()
            os.fsync(log.fileno())
    log = open(path, "a+", encoding="utf-8")
    if log.tell() > 0:
        log.seek(log.tell() - 1)
        last = log.read(1)
        log.seek(0, os.SEEK_END)
        if last != "\n":
            log.write("\n")
    return log


def _remove_temporaries(out: Path) -> None:
    """Temporary files of earlier or failed runs in OUT (only ever called while holding OUT's lock)."""
    remove_stale_temporaries(out)
    for legacy in [*out.glob(".*-[0-9]*.tar.tmp"), *out.glob(".*-[0-9]*.idx.tmp")]:  # named so before files.py
        with contextlib.suppress(OSError):
            legacy.unlink()


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where it is safe (Linux, no other Python thread): workers start in milliseconds and
    inherit the imports; spawn elsewhere (each worker then imports webdataset itself)."""
    if sys.platform == "linux" and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


_images_done = None  # a shared counter in worker processes, for the progress display


def _init_worker(counter: multiprocessing.sharedctypes.Synchronized) -> None:
    """Ctrl-C is the main process's to handle: it stops the pool; the next run removes the temporaries."""
    global _images_done
    _images_done = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _count_image() -> None:
    if _images_done is not None:
        with _images_done.get_lock():
            _images_done.value += 1


def _write_shard(task: tuple, on_image: Callable[[], None] = _count_image) -> dict:
    """Convert the candidates of one shard in order and write it atomically; returns its record."""
    source, out, plan, classes, (max_side, quality, max_pixels), within, seg = task
    writer = _ShardWriter(out, plan.name)
    skipped, actions = [], Counter()
    try:
        for offset, candidate in enumerate(plan.items):
            mask = None
            if candidate.label < 0:
                converted, reason = None, NOT_IN_A_CLASS
            else:
                job = (str(source / candidate.path), max_side, quality, max_pixels)
                converted, reason = _convert_file(job, within)
            if converted is not None and seg is not None:
                checked, reason = _convert_mask_file(str(source / candidate.mask), candidate.mask, converted, seg,
                                                     max_pixels)
                converted, mask = (converted, (candidate.mask, checked)) if checked is not None else (None, None)
            if converted is None:
                skipped.append(_skip_record(candidate.path, reason))
            else:
                actions.update(converted.actions or ("kept",))
                if mask is not None:
                    actions.update(mask[1].actions)
                components = _sample_components(candidate.label, classes[candidate.label], candidate.path, converted,
                                                mask)
                writer.write(_sample_key(plan.split, plan.start + offset), components)
            on_image()
        if writer.index_lines:
            entry = writer.commit()
        else:  # every candidate skipped: no empty tar (DALI's index format cannot describe one)
            writer.abort()
            entry = None
    except BaseException:
        writer.abort()
        raise
    return {"name": plan.name, "split": plan.split, "found": len(plan.items), "entry": entry,
            "skipped": skipped, "actions": dict(sorted(actions.items()))}


def _finish(
    out: Path, plans: list[ShardPlan], listing: Listing, splits: list[str], options: dict, records: dict[str, dict],
) -> dict:
    """Write skipped.jsonl and manifest.json from the listing and the shard records (the manifest last)."""
    split_info: dict[str, dict] = {}
    skipped_lines: list[str] = []
    actions: Counter = Counter()
    for split in splits:
        refused = listing.refused.get(split, [])
        found = len(listing.candidates.get(split, ())) + len(refused)
        shards, written, skipped = [], 0, len(refused)
        skipped_lines.extend(json.dumps(s, ensure_ascii=False) for s in refused)
        for plan in (p for p in plans if p.split == split):
            record = records[plan.name]
            skipped += len(record["skipped"])
            skipped_lines.extend(json.dumps(s, ensure_ascii=False) for s in record["skipped"])
            actions.update(record["actions"])
            if record["entry"] is not None:
                shards.append(record["entry"])
                written += record["entry"]["num_samples"]
        if written + skipped != found:
            raise RuntimeError(f"{split}: written {written} + skipped {skipped} != found {found}")
        split_info[split] = {"num_samples": written, "found": found, "skipped": skipped, "shards": shards}
    write_text_atomic(out / SKIPPED_NAME, "".join(line + "\n" for line in skipped_lines))
    kept_masks = actions.pop("mask-kept", 0)
    total_written = sum(info["num_samples"] for info in split_info.values())
    if total_written == 0:
        (out / PROGRESS_LOG).unlink(missing_ok=True)  # nothing usable: do not let a re-run "resume" this
        raise UserError(
            f"none of the {sum(info['found'] for info in split_info.values())} inputs under {options['source']} "
            f"is a usable image (reasons in {out / SKIPPED_NAME})"
        )
    manifest = {
        "format": FORMAT,
        "classes": listing.classes,
        "splits": {split: info for split, info in split_info.items() if info["num_samples"] > 0},
        "found": sum(info["found"] for info in split_info.values()),
        "written": total_written,
        "skipped": sum(info["skipped"] for info in split_info.values()),
        "conversions": {k: v for k, v in sorted(actions.items()) if k != "kept"},
        "kept_original_bytes": actions.get("kept", 0),
        "options": options,
    }
    if listing.segmentation is not None:
        manifest.update(task=TASK, segmentation=listing.segmentation.record(), kept_original_label_maps=kept_masks)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def _print_tally(out: Path, manifest: dict) -> None:
    for split, info in manifest["splits"].items():
        print(f"{split}: found {info['found']}, written {info['num_samples']}, skipped {info['skipped']}, "
              f"{len(info['shards'])} shard{'s' if len(info['shards']) != 1 else ''}")
    conversions = ", ".join(f"{k} {v}" for k, v in manifest["conversions"].items()) or "none"
    print(f"re-encoded or converted: {conversions}; original bytes kept: {manifest['kept_original_bytes']}")
    spec = spec_from_manifest(manifest)
    if spec is not None:
        print(f"label maps: {spec.describe()}; {'image classes from the class folders' if spec.image_classes else 'no image classes'}; "
              f"original bytes kept: {manifest['kept_original_label_maps']}")
    print(f"total: found {manifest['found']}, written {manifest['written']}, skipped {manifest['skipped']} "
          f"-> {out} (skipped inputs and reasons: {out / SKIPPED_NAME})")


# --------------------------------------------------------------------------------------------
# Checking a shard: --verify, and every shard a re-run reuses


class _HashingReader:
    """A read-only file wrapper that hashes what is read, so a tar is checked in one pass."""

    def __init__(self, file: io.BufferedReader):
        self.file = file
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _BadShard(Exception):
    """A tar or index that does not hold what it should; the message is the one-line reason."""


class _TarScan(NamedTuple):
    """One read of a tar: its sha256, each member's (name, data offset, size) in tar order, and
    the data of the components asked for, by sample key and extension."""

    sha256: str
    members: list[tuple[str, int, int]]
    samples: dict[str, dict[str, bytes | None]]


def _scan_tar(path: Path, keep: Iterable[str] = ()) -> _TarScan:
    """Stream `path` once (headers, hash, the `keep` components' data); raises BadShard if it is no readable tar."""
    keep = frozenset(keep)
    members: list[tuple[str, int, int]] = []
    samples: dict[str, dict[str, bytes | None]] = {}
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    members.append((member.name, member.offset_data, member.size))
                    wanted = ext in keep and member.isfile()
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read() if wanted else None
        except (tarfile.TarError, OSError, EOFError) as err:
            raise _BadShard(f"{path.name}: not a readable tar ({_describe(err)}); re-run `droppos shard`") from None
        reader.drain()
    return _TarScan(reader.sha256.hexdigest(), members, samples)


def _index_problem(index: Path, members: list[tuple[str, int, int]]) -> str | None:
    """What is wrong with a DALI index given the tar's real headers (None: it matches entry by entry).

    DALI reads a component at the offset and size its index gives, trusting the name: one
    wrong offset makes it train on another sample's label. So every entry must name the
    component the tar holds at that data offset, with that size, on the line of its sample,
    and every component of the tar must be listed once, in tar order.
    """
    expected: list[list[tuple[str, str, str, str]]] = []
    key = None
    for name, offset, size in members:
        member_key, _, ext = name.partition(".")
        if member_key != key:
            expected.append([])
            key = member_key
        expected[-1].append((ext, str(offset), str(size), name))
    try:
        lines = index.read_bytes().decode("ascii").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        return f"cannot be read as an index ({_describe(err)})"
    if lines and lines[-1] == "":
        lines.pop()
    header = lines[0].split() if lines else []
    if header != [INDEX_VERSION, str(len(expected))]:
        return f"header {' '.join(header)!r} does not match the {len(expected)} samples of the tar"
    if len(lines) - 1 != len(expected):
        return f"{len(lines) - 1} sample lines for the {len(expected)} samples of the tar"
    held = {str(offset): (name, size) for name, offset, size in members}
    for number, (line, components) in enumerate(zip(lines[1:], expected), 2):
        fields = line.split()
        listed = [tuple(fields[i : i + 4]) for i in range(0, len(fields), 4)]
        if listed == components:
            continue
        sample = components[0][3].partition(".")[0]
        wrong = next((got for got, want in zip(listed, components) if got != want), None)
        if wrong is None or len(wrong) != 4:
            return f"line {number} lists {len(fields) / 4:g} components, the tar holds {len(components)} for sample {sample}"
        ext, offset, size, name = wrong
        there = held.get(offset)
        actual = f"{there[0]} ({there[1]} bytes)" if there else "no member's data"
        return f"line {number}: {ext} entry `{name}` at offset {offset} ({size} bytes), but the tar holds {actual} there"
    return None


def verify(path: Path, decode: bool = False) -> dict:
    """Re-check every listed shard: size, sha256, sample count, index; with decode, every image.

    Raises UserError with a one-line reason at the first mismatch; returns per-split counts.
    """
    data_dir = Path(path)
    manifest = load_manifest(data_dir)
    try:
        seg = spec_from_manifest(manifest, str(data_dir / MANIFEST_NAME))
    except BadManifest as err:
        raise UserError(str(err)) from None
    entries = {split: split_shards(data_dir, split, manifest) for split in manifest["splits"]}
    total_bytes = sum(e.bytes for shards in entries.values() for e in shards)
    progress = _Progress("verify", total_bytes, unit="bytes")
    counts: dict[str, int] = {}
    try:
        for split, shards in entries.items():
            counts[split] = 0
            for entry in shards:
                counts[split] += _verify_shard(entry, decode, seg)
                progress.advance(entry.bytes)
            expected = manifest["splits"][split]["num_samples"]
            if counts[split] != expected:
                raise UserError(f"split {split!r}: shards hold {counts[split]} samples, manifest says {expected}")
    finally:
        progress.close()
    summary = ", ".join(f"{split} {n} samples in {len(entries[split])} shard{'s' if len(entries[split]) != 1 else ''}"
                        for split, n in counts.items())
    print(f"verified {data_dir}: {summary}; sha256, sample counts and indexes match"
          + (("; every image and label map decodes" if seg else "; every image decodes") if decode else ""))
    return counts


def _verify_shard(entry: ShardEntry, decode: bool, seg: SegSpec | None = None) -> int:
    """Check one shard in a single read of its tar; returns its sample count."""
    name = entry.tar.name
    if entry.tar.stat().st_size != entry.bytes:
        raise UserError(f"{name}: size {entry.tar.stat().st_size} bytes, manifest says {entry.bytes}; re-run `droppos shard`")
    try:
        scan = _scan_tar(entry.tar, ("jpg", "cls", "lbl", MASK_COMPONENT) if decode else ())
    except _BadShard as err:
        raise UserError(str(err)) from None
    if scan.sha256 != entry.sha256:
        raise UserError(f"{name}: sha256 differs from the manifest (corrupt or modified); re-run `droppos shard`")
    if len(scan.samples) != entry.num_samples:
        raise UserError(f"{name}: {len(scan.samples)} samples, manifest says {entry.num_samples}")
    for key, components in scan.samples.items():
        missing = {"jpg", "cls", "lbl", "json", *((MASK_COMPONENT,) if seg else ())} - set(components)
        if missing:
            raise UserError(f"{name}: sample {key} lacks {', '.join(sorted(missing))}")
    problem = _index_problem(entry.index, scan.members)
    if problem is not None:
        raise UserError(f"{entry.index.name}: {problem}: the index is corrupt or modified; re-run `droppos shard`")
    if decode:
        for key, components in scan.samples.items():
            _verify_sample(name, key, components, seg)
    return len(scan.samples)


def _verify_sample(shard: str, key: str, components: dict, seg: SegSpec | None = None) -> None:
    label = components["lbl"]
    if len(label) != 4 or str(struct.unpack("<i", label)[0]).encode() != components["cls"]:
        raise UserError(f"{shard}: sample {key} has inconsistent cls/lbl labels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(components["jpg"])) as im:
                im.load()
                ok = im.format == "JPEG" and im.mode == "RGB"
                size = im.size
    except Exception as err:
        raise UserError(f"{shard}: sample {key}: image does not decode ({_describe(err)})") from None
    if not ok:
        raise UserError(f"{shard}: sample {key} is not an RGB JPEG")
    if seg is None:
        return
    try:
        labels = decode_label_map(components[MASK_COMPONENT])
    except Exception as err:
        raise UserError(f"{shard}: sample {key}: label map does not decode ({_describe(err)})") from None
    if labels.shape[::-1] != size:
        raise UserError(f"{shard}: sample {key}: label map {labels.shape[1]}x{labels.shape[0]}, image "
                        f"{size[0]}x{size[1]}")
    bad = seg.out_of_range(labels)
    if bad:
        raise UserError(f"{shard}: sample {key}: label values {bad[:8]} are not classes of {seg.describe()}")
