"""The dataset directory contract: `manifest.json` next to `{split}-{NNNNNN}.tar` + `.idx`.

`droppos shard` writes it; every loader reads it through this module, and trusts no
file that the manifest does not list. Paths in the manifest are relative to the
dataset directory, so a dataset can be moved or copied as a whole.

A manifest is untrusted input: `split_shards` hands out only files that lie inside the
dataset directory once `..`, absolute paths and symlinks are resolved, and only indexes
whose sha256 is the one recorded (`index_sha256`), so a loader never follows a planted
path or a modified DALI index. A manifest written before index hashes were recorded
(no `index_sha256`) still loads, with a warning once per directory; re-running the same
`droppos shard` command checks those indexes against their tars and records the hashes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NamedTuple, Optional

from droppos import UserError
from droppos.files import file_sha256, read_json_input

FORMAT = "droppos-wds/1"
MANIFEST_NAME = "manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_warned_unhashed: set[Path] = set()  # dataset directories already warned about (once per process)


class ShardEntry(NamedTuple):
    """One listed shard, with resolved absolute paths (both inside the dataset directory)."""

    tar: Path
    index: Path
    num_samples: int
    bytes: int
    sha256: str
    index_sha256: Optional[str] = None  # None: a manifest written before index hashes were recorded


MANIFEST_MAX_BYTES = 256 << 20  # a manifest lists shards, not samples: megabytes for ImageNet-21k


def load_manifest(data_dir: Path) -> dict:
    """Read `data_dir/manifest.json`; a missing, unreadable or foreign manifest is a UserError."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not data_dir.is_dir():
        raise UserError(f"dataset directory {data_dir} does not exist; write one with `droppos shard`")
    if not path.exists() and not path.is_symlink():  # anything else there is read (and refused) by read_json_input
        raise UserError(f"{path} is missing: {data_dir} is not a finished `droppos shard` dataset (re-run the shard command)")
    manifest = read_json_input(path, "manifest", max_bytes=MANIFEST_MAX_BYTES)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{path} has format {found!r}, expected {FORMAT!r}; re-shard with this version of droppos")
    if not isinstance(manifest.get("splits"), dict) or not isinstance(manifest.get("classes"), list):
        raise UserError(f"{path} lacks 'splits' or 'classes'; re-shard with `droppos shard`")
    return manifest


def confined(data_dir: Path, name: object, what: str) -> Path:
    """`data_dir/name` resolved, refused unless it lies inside the resolved `data_dir`.

    Resolving first (`..`, an absolute `name`, symlinks anywhere on the way) and then comparing
    is what makes the check hold: a name that merely looks relative can still lead outside.
    """
    data_dir = Path(data_dir).absolute()
    if not isinstance(name, str) or not name or "\0" in name:
        raise UserError(f"{data_dir / MANIFEST_NAME}: {what} has no valid file name ({name!r}); re-run `droppos shard`")
    root = data_dir.resolve()
    resolved = (data_dir / name).resolve()
    if not resolved.is_relative_to(root):
        raise UserError(f"{data_dir / MANIFEST_NAME}: {what} {name!r} resolves to {resolved}, outside the dataset "
                        f"directory {root}; refusing to read it")
    return resolved


def split_shards(data_dir: Path, split: str, manifest: dict | None = None) -> list[ShardEntry]:
    """The shards of one split, each confined to `data_dir` and its index checked against its sha256.

    An unknown split, a malformed entry, a path outside the directory, a missing file or a
    modified index is a one-line UserError.
    """
    data_dir = Path(data_dir).absolute()
    manifest = load_manifest(data_dir) if manifest is None else manifest
    splits = manifest["splits"]
    if split not in splits:
        available = ", ".join(sorted(splits)) or "none"
        raise UserError(f"{data_dir} has no split {split!r} (available: {available})")
    shards = splits[split].get("shards") if isinstance(splits[split], dict) else None
    if not isinstance(shards, list):
        raise UserError(f"{data_dir / MANIFEST_NAME}: split {split!r} has no list of shards; re-run `droppos shard`")
    entries = [_entry(data_dir, split, number, shard) for number, shard in enumerate(shards)]
    if entries and any(e.index_sha256 is None for e in entries) and data_dir not in _warned_unhashed:
        _warned_unhashed.add(data_dir)
        print(f"droppos: warning: {data_dir / MANIFEST_NAME} records no index sha256 (written by an older droppos), so "
              "its DALI indexes are not checked; re-run the same `droppos shard` command to check and record them",
              file=sys.stderr)
    return entries


def _entry(data_dir: Path, split: str, number: int, shard: object) -> ShardEntry:
    """One manifest shard record as a checked ShardEntry."""
    where = f"split {split!r} shard {number}"
    if not isinstance(shard, dict):
        raise UserError(f"{data_dir / MANIFEST_NAME}: {where} is not an object; re-run `droppos shard`")
    counts = {key: shard.get(key) for key in ("num_samples", "bytes")}
    index_sha256 = shard.get("index_sha256")
    if (any(type(value) is not int or value < 0 for value in counts.values())
            or not isinstance(shard.get("sha256"), str) or not _SHA256.fullmatch(shard["sha256"])
            or not (index_sha256 is None or isinstance(index_sha256, str) and _SHA256.fullmatch(index_sha256))):
        raise UserError(f"{data_dir / MANIFEST_NAME}: {where} has malformed counts or hashes; re-run `droppos shard`")
    entry = ShardEntry(
        tar=confined(data_dir, shard.get("tar"), f"{where} tar"),
        index=confined(data_dir, shard.get("index"), f"{where} index"),
        num_samples=counts["num_samples"],
        bytes=counts["bytes"],
        sha256=shard["sha256"],
        index_sha256=index_sha256,
    )
    for path in (entry.tar, entry.index):
        if not path.is_file():
            raise UserError(f"{path} is listed in {data_dir / MANIFEST_NAME} but missing; re-run `droppos shard`")
    if index_sha256 is not None:
        try:
            actual = file_sha256(entry.index)
        except OSError as err:
            raise UserError(f"cannot read {entry.index}: {err.strerror}") from None
        if actual != index_sha256:
            raise UserError(f"{entry.index}: sha256 differs from {data_dir / MANIFEST_NAME} (the index is corrupt or "
                            "modified); re-run `droppos shard`")
    return entry
