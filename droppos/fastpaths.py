"""The private APIs droppos leans on: those of its package here, behind named functions (fast paths behind one
switch, and calls with no public equivalent), and a list of the few kept where they are used.

Fast paths use something a library does not promise to keep (a private function, an undocumented attribute,
a C library's tuning call) and have a plain path that uses only public APIs. `DROPPOS_FAST_PATHS=0` in the
environment (read once, when this module is first imported) turns every fast path off; `enabled()` says which
is in force. The plain paths give the same batches, bit for bit (tests/test_data.py compares both in pretrain
and eval modes); they are only slower. Turn them off when a new Pillow, torch or libc breaks one, to tell a
fast path's bug from droppos's own.
- `decode_rows`: Pillow's JPEG decoder driven by hand (`Image.core.new`, `Image._getdecoder`, the
  opened image's `tile`, `fp` and `decoderconfig`) to decode only the rows a crop needs. Plain:
  None, so the caller decodes the whole image (`Image.load`); the resized crop is the same.
- `storage_use_count`: torch's `torch._C._storage_Use_Count`, so the CPU output pool reuses a
  batch's memory once no one else holds it. Plain: None, so every batch is freshly allocated.
- `shared_storage`: `torch.UntypedStorage._new_shared`, shared memory without a first private
  copy. Plain: `Tensor.share_memory_()` on a new tensor (one extra copy, once per loader).
- `keep_heap`: glibc's `mallopt` (through ctypes) so large blocks stay in the heap and are not
  page-faulted in again every step. Plain: the allocator's defaults.

Private calls with no plain path (the switch does not touch them):
- `vit_pos_embed`: timm's `VisionTransformer._pos_embed` (eval-pos runs a ViT piece by piece).
- `tar_samples`: webdataset's `tariterators.tar_file_iterator` and `group_by_keys`, which its top level does
  not export (the loaders read a tar from an offset its index gives).

Kept where they are used (look there too when a library changes):
- cli.py: `typer._click` (the click that typer vendors: its exception types);
- droppos/pretrain.py: `torch._foreach_norm` and `torch._foreach_mul_` (per-parameter gradient clipping);
- droppos/distributed.py: torch.compile's `_orig_mod` attribute and key prefix (`unwrap`, `WRAPPER_PREFIXES`,
  which droppos/weights.py strips with);
- benchmarks/bench_step.py: `torch._dynamo.utils.counters` and `torch.utils._python_dispatch.TorchDispatchMode`;
- tests/test_model.py: `torch._dynamo.explain` and `torch._dynamo.config`.
"""

from __future__ import annotations

import os

ENV = "DROPPOS_FAST_PATHS"
_OFF = ("0", "false", "no", "off")
_ENABLED = os.environ.get(ENV, "1").strip().lower() not in _OFF

__all__ = ["ENV", "enabled", "decode_rows", "storage_use_count", "shared_storage", "keep_heap", "vit_pos_embed",
           "tar_samples"]


def enabled() -> bool:
    """True unless `DROPPOS_FAST_PATHS` was 0 (or false/no/off) when droppos was imported."""
    return _ENABLED


_UNWRITTEN = (1, 254, 3)  # marks a row the decoder has not written (any colour would do)


def decode_rows(img, rows: int):
    """The first `rows` rows of an opened (and drafted) RGB JPEG, or None: then decode it all.

    libjpeg decodes top to bottom, so stopping after the rows a crop needs saves the rest of the decode
    (how much: docs/measurements.md); the resized crop is bit-identical. Pillow has no public
    call for it: this runs its JPEG decoder on an image of `rows` rows. libjpeg then reports the
    rows left unread as an error when it finishes, which is indistinguishable by code from a
    corrupt stream; so the last row is marked first and must have been overwritten. Anything
    unexpected returns None and the caller decodes the whole image the ordinary way (which also
    raises for a corrupt file).
    """
    if not _ENABLED:
        return None
    from PIL import Image

    try:
        (codec, _, offset, args), = img.tile
        width = img.size[0]
        core = Image.core.new("RGB", (width, rows))
        core.paste(_UNWRITTEN, (0, rows - 1, width, rows))
        decoder = Image._getdecoder("RGB", codec, args, img.decoderconfig)
        try:
            decoder.setimage(core, (0, 0, width, rows))
            img.fp.seek(offset)
            consumed, _ = decoder.decode(img.fp.read())
        finally:
            decoder.cleanup()
    except Exception:
        return None
    if consumed >= 0 or any(core.getpixel((x, rows - 1)) == _UNWRITTEN for x in (0, width // 2, width - 1)):
        return None  # the decoder wanted more data, or stopped before the last row
    return Image.Image()._new(core)


def storage_use_count(storage) -> int | None:
    """How many tensors (and views, and numpy arrays) hold `storage`; None when not known."""
    if not _ENABLED:
        return None
    import torch

    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(storage._cdata))


def shared_storage(nbytes: int):
    """A new `torch.UntypedStorage` of `nbytes` in shared memory (DataLoader workers write into it)."""
    import torch

    if _ENABLED and hasattr(torch.UntypedStorage, "_new_shared"):
        return torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(nbytes, dtype=torch.uint8).share_memory_().untyped_storage()


def keep_heap() -> bool:
    """glibc only: large blocks from the heap (no mmap), never trimmed, so steps reuse memory without page faults.

    torch's CPU allocator is plain malloc/free; glibc's default hands blocks above a (dynamic, at most 32 MiB)
    threshold back to the kernel on free, so the next step faults every page in again. True if glibc took it.
    """
    if not _ENABLED:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def vit_pos_embed(vit, x):
    """timm's `vit._pos_embed(x)`: patch tokens `x` with their PE added and the prefix tokens ([CLS], registers)
    prepended, in whatever way the model's variant does it. Private in timm, with no public equivalent."""
    return vit._pos_embed(x)


def tar_samples(stream, select, url: str):
    """Samples (dicts by component, with `__key__` and `__url__`) of the tar `stream` from where it stands, members
    whose name `select` accepts; `url` names the tar in them. webdataset's public readers open a URL from its start."""
    import webdataset as wds

    members = wds.tariterators.tar_file_iterator(stream, select_files=select)
    return wds.tariterators.group_by_keys(dict(member, __url__=url) for member in members)
