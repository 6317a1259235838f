"""`droppos shard --verify DIR`: re-check a finished dataset against its manifest.

Every listed shard is read once: its size, sha256 and sample count, every sample's components,
and its DALI index entry by entry against the tar's real headers (one wrong offset would make
DALI train on another sample's label). With --decode, every image and label map is decoded too.
The first mismatch ends the check with one line (UserError).
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

from PIL import Image

from droppos import UserError
from droppos.labelmaps import MASK_COMPONENT, BadManifest, SegSpec, decode_label_map, spec_from_manifest
from droppos.manifest import MANIFEST_NAME, ShardEntry, load_manifest, split_shards
from droppos.progress import Progress
from droppos.shard import writer
from droppos.shard.inputs import describe
from droppos.tarindex import BadTar, index_problem, scan_tar


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
    progress = Progress("verify", total_bytes, unit="bytes", plain_every_s=writer.LOG_EVERY_S)
    counts: dict[str, int] = {}
    try:
        for split, shards in entries.items():
            counts[split] = 0
            for entry in shards:
                counts[split] += _verify_shard(entry, decode, seg, len(manifest["classes"]))
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


def _verify_shard(entry: ShardEntry, decode: bool, seg: SegSpec | None = None, num_classes: int = 0) -> int:
    """Check one shard in a single read of its tar (every label within the manifest's classes, too); returns its
    sample count."""
    name = entry.tar.name
    if entry.tar.stat().st_size != entry.bytes:
        raise UserError(f"{name}: size {entry.tar.stat().st_size} bytes, manifest says {entry.bytes}; re-run `droppos shard`")
    try:
        scan = scan_tar(entry.tar, ("jpg", "cls", "lbl", MASK_COMPONENT) if decode else ("lbl",))
    except BadTar as err:
        raise UserError(str(err)) from None
    if scan.sha256 != entry.sha256:
        raise UserError(f"{name}: sha256 differs from the manifest (corrupt or modified); re-run `droppos shard`")
    if len(scan.samples) != entry.num_samples:
        raise UserError(f"{name}: {len(scan.samples)} samples, manifest says {entry.num_samples}")
    for key, components in scan.samples.items():
        missing = {"jpg", "cls", "lbl", "json", *((MASK_COMPONENT,) if seg else ())} - set(components)
        if missing:
            raise UserError(f"{name}: sample {key} lacks {', '.join(sorted(missing))}")
    for key, components in scan.samples.items():
        label = components.get("lbl", b"")
        value = struct.unpack("<i", label)[0] if len(label) == 4 else None
        if value is None or (num_classes and not 0 <= value < num_classes):
            raise UserError(f"{name}: sample {key} has label {value}, but the manifest lists {num_classes} classes "
                            "(0..{}): the manifest or the shard was modified; re-run `droppos shard`".format(num_classes - 1))
    problem = index_problem(entry.index, scan.members)
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
        raise UserError(f"{shard}: sample {key}: image does not decode ({describe(err)})") from None
    if not ok:
        raise UserError(f"{shard}: sample {key} is not an RGB JPEG")
    if seg is None:
        return
    try:
        labels = decode_label_map(components[MASK_COMPONENT])
    except Exception as err:
        raise UserError(f"{shard}: sample {key}: label map does not decode ({describe(err)})") from None
    if labels.shape[::-1] != size:
        raise UserError(f"{shard}: sample {key}: label map {labels.shape[1]}x{labels.shape[0]}, image "
                        f"{size[0]}x{size[1]}")
    bad = seg.out_of_range(labels)
    if bad:
        raise UserError(f"{shard}: sample {key}: label values {bad[:8]} are not classes of {seg.describe()}")
