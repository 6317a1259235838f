"""`droppos shard` from its options to the manifest: checks, OUT's lock, discovery, then the writer.

OUT is claimed through `files.claim_output` (apart from SOURCE and the --list files, no other command's
output, one `shard` at a time). A user mistake (missing SOURCE, OUT inside what is read, a bad option)
ends with one line (UserError); an OS error while writing ends the run with one line too, temporaries
removed, finished shards and the progress log kept.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable

from droppos import UserError
from droppos.files import claim_output
from droppos.shard import writer
from droppos.shard.convert import DEFAULT_MAX_PIXELS
from droppos.shard.discover import (
    IMAGENET_SPLITS, SegLayout, detect_layout, discover_imagenet, discover_lists, discover_segmentation, rel_join,
)
from droppos.shard.inputs import path_fields, source_confinement

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
    follow_links: bool = False,
) -> dict:
    """Shard SOURCE (or the built-in sample data) into OUT; resumes a previous run; returns the manifest.

    `layout` says what SOURCE holds (auto: recognised; see `detect_layout`); `ignore_index` and
    `reduce_zero_label` override a segmentation layout's convention. Nothing that resolves outside
    SOURCE through a symlink is read (each such entry is a counted skip) unless `follow_links`. The
    sample data comes with its label maps (`sample_options` may say `masks=False`). Holds OUT's lock
    for the whole run: a second `shard` on the same OUT stops with one line.
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
    inputs = [] if sample else [("SOURCE", source), *((f"--list ({split})", path) for split, path in lists.items())]
    with claim_output(out, "shard", inputs, label="OUT"):
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
            _check_out_outside(out, [source / rel_join(root, folder) for folder in seg.splits.values()
                                     for root in (seg.images, seg.masks)])
        return _run_locked(source, out, lists, seed, workers, max_side, quality, shard_size, max_pixels, sample, seg,
                           follow_links)


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
    shard_size: int, max_pixels: int, sample: bool, seg: SegLayout | None = None, follow_links: bool = False,
) -> dict:
    """The run, with OUT locked and SOURCE checked."""
    within = source_confinement(source, follow_links)  # what every listing and every read must stay in
    if seg is not None:
        listing = discover_segmentation(source, seg)
    else:
        listing = discover_lists(source, lists) if lists else discover_imagenet(source, within)
    found = listing.candidates
    splits = [s for s in _split_order({*found, *listing.refused}) if found.get(s) or listing.refused.get(s)]
    total_found = sum(len(found.get(s, ())) + len(listing.refused.get(s, ())) for s in splits)
    if total_found == 0:
        if seg is not None:
            where = rel_join(seg.images, "{train,val}")
            raise UserError(f"SOURCE {source} has no images under {where} ({seg.name} layout)")
        raise UserError(f"SOURCE {source} has no files in its class folders (expected SOURCE/train/<class>/*.JPEG)")

    options = {
        "source": path_fields(str(source))["path"],
        "mode": seg.name if seg is not None else "list" if lists else "imagenet",
        "lists": {split: path_fields(str(Path(path).absolute()))["path"] for split, path in lists.items()},
        "sample": sample,
        "seed": seed,
        "shard_size": shard_size,
        "max_side": max_side,
        "quality": quality,
        "max_pixels": max_pixels,
        "follow_links": follow_links,
    }
    planned = [s for s in splits if found.get(s)]
    plans = writer.plan_shards(found, planned, seed, shard_size)
    options["fingerprint"] = writer.dataset_fingerprint(listing.classes, found, planned, options, listing.segmentation)

    records = writer.resume(out, options["fingerprint"])
    todo = [plan for plan in plans if plan.name not in records]
    if len(todo) < len(plans):
        print(f"resuming: {len(plans) - len(todo)} of {len(plans)} shards already complete and verified",
              file=sys.stderr, flush=True)
    if todo:
        writer.write_shards(source, out, todo, listing.classes, options, workers, records, within, listing.segmentation)

    manifest = writer.finish(out, plans, listing, splits, options, records)
    writer.print_tally(out, manifest)
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


