"""The dataset directory contract: `manifest.json` next to `{split}-{NNNNNN}.tar` + `.idx`.

`droppos shard` writes it; every loader reads it through this module, and trusts no
file that the manifest does not list. Paths in the manifest are relative to the
dataset directory, so a dataset can be moved or copied as a whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from droppos import UserError
from droppos.files import fsync_dir, write_json_atomic  # noqa: F401 - re-exported for the shard stage

FORMAT = "droppos-wds/1"
MANIFEST_NAME = "manifest.json"


class ShardEntry(NamedTuple):
    """One listed shard, with absolute paths."""

    tar: Path
    index: Path
    num_samples: int
    bytes: int
    sha256: str


def load_manifest(data_dir: Path) -> dict:
    """Read `data_dir/manifest.json`; a missing, unreadable or foreign manifest is a UserError."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not data_dir.is_dir():
        raise UserError(f"dataset directory {data_dir} does not exist; write one with `droppos shard`")
    if not path.is_file():
        raise UserError(f"{path} is missing: {data_dir} is not a finished `droppos shard` dataset (re-run the shard command)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{path} has format {found!r}, expected {FORMAT!r}; re-shard with this version of droppos")
    if not isinstance(manifest.get("splits"), dict) or not isinstance(manifest.get("classes"), list):
        raise UserError(f"{path} lacks 'splits' or 'classes'; re-shard with `droppos shard`")
    return manifest


def split_shards(data_dir: Path, split: str, manifest: dict | None = None) -> list[ShardEntry]:
    """The shards of one split, absolute paths; an unknown split or a missing file is a UserError."""
    data_dir = Path(data_dir).absolute()
    manifest = load_manifest(data_dir) if manifest is None else manifest
    splits = manifest["splits"]
    if split not in splits:
        available = ", ".join(sorted(splits)) or "none"
        raise UserError(f"{data_dir} has no split {split!r} (available: {available})")
    entries = []
    for shard in splits[split]["shards"]:
        entry = ShardEntry(
            tar=data_dir / shard["tar"],
            index=data_dir / shard["index"],
            num_samples=int(shard["num_samples"]),
            bytes=int(shard["bytes"]),
            sha256=str(shard["sha256"]),
        )
        for path in (entry.tar, entry.index):
            if not path.is_file():
                raise UserError(f"{path} is listed in {data_dir / MANIFEST_NAME} but missing; re-run `droppos shard`")
        entries.append(entry)
    return entries
