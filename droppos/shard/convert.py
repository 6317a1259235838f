"""Turning one input into what a sample stores: an RGB baseline JPEG, and a checked label map.

DALI has no per-sample skip and applies EXIF orientation where Pillow does not, so every image
is decoded fully here; whatever DALI and Pillow could disagree on (CMYK, grayscale, 16-bit,
palette, alpha, non-JPEG data, EXIF rotation, progressive or damaged JPEG structure) is
re-encoded as an RGB baseline JPEG, and a valid RGB baseline JPEG keeps its original bytes.
Progressive JPEGs are re-encoded too (the dataset promises baseline JPEGs, which every decoder,
nvJPEG's hardware path included, takes fast); the manifest counts them. What cannot be decoded
raises SkipImage with the reason. A label map goes through the same checks, must follow its
image's pixel grid, and keeps its PNG bytes unless it had to change (then re-encoded losslessly).
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import warnings
from typing import Iterator, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError, features

from droppos.files import Confinement
from droppos.labelmaps import SegSpec, encode_label_map
from droppos.shard.inputs import SkipImage, describe, read_input

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame, not DHT/JPG/DAC
JPEG_DRAFT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg decodes at, largest first (what Image.draft picks)
# Pillow's name of an optional decoder -> (what a user calls it, the Debian package of its headers).
CODECS = {"webp": ("WebP", "libwebp-dev"), "libtiff": ("libtiff", "libtiff-dev"), "jpeg2k": ("JPEG 2000", "libopenjp2-7-dev")}
_MISSING_DECODER = re.compile(r"decoder (\w+) not available")


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
            raise SkipImage(_missing_codec_in(err) or f"unreadable image header: {describe(err)}") from None
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
            raise SkipImage(_missing_codec_in(err) or f"corrupt or truncated: {describe(err)}") from None
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


def convert_file(job: tuple[str, int, int, int], within: Confinement | None = None) -> tuple[Converted | None, str]:
    """Worker: read and convert one file; returns (result, "") or (None, reason)."""
    path, max_side, quality, max_pixels = job
    try:
        return convert_image(read_input(path, within), max_side, quality, max_pixels), ""
    except SkipImage as err:
        return None, str(err)
    except MemoryError:
        return None, "decompression bomb: out of memory while decoding"


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
            raise SkipImage(f"unreadable header: {describe(err)}") from None
        if im.format != "PNG":
            raise SkipImage(f"a {im.format} file: label maps must be PNGs (lossless; a JPEG's edges change labels)")
        if im.size[0] * im.size[1] > max_pixels:
            raise SkipImage(f"decompression bomb: {im.size[0]}x{im.size[1]} pixels exceed the limit of {max_pixels}")
        try:
            im.load()
            orientation = _mask_orientation(im)
        except Exception as err:
            raise SkipImage(f"corrupt or truncated: {describe(err)}") from None
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


def convert_mask_file(path: str, rel: str, image: Converted, spec: SegSpec, max_pixels: int,
                      within: Confinement | None = None) -> tuple[ConvertedMask | None, str]:
    """Worker: read and check one label map; returns (result, "") or (None, reason naming the label map)."""
    try:
        return convert_mask(read_input(path, within), image, spec, max_pixels), ""
    except SkipImage as err:
        return None, f"label map {rel}: {err}"
    except MemoryError:
        return None, f"label map {rel}: decompression bomb: out of memory while decoding"

