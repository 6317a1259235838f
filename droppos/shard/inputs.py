"""Reading one input file safely, and naming it in records.

Every input is read through droppos.files' one opener (`read_input`): only a regular file (a FIFO
would block the read forever, a device may never end), of at most IMAGE_MAX_BYTES, with a name the
system can take and, unless --follow-links, only when it resolves inside SOURCE (`source_confinement`).
Its refusal reasons are the skip reasons. A name that is not valid UTF-8 is still recorded: U+FFFD
for the bad bytes in `path`, the original bytes in `path_bytes`.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from droppos import files
from droppos.files import Confinement, InputError

IMAGE_MAX_BYTES = 1 << 30  # an image or label map larger than 1 GiB is no photo: skipped, never read
LIST_MAX_BYTES = 1 << 30  # a --list file (ImageNet-1k's train list is about 40 MB)
FOLLOW_LINKS = "--follow-links admits it"


class SkipImage(Exception):
    """An input that cannot become a sample; the message is the reason written to skipped.jsonl."""


def source_confinement(source: Path | str, follow_links: bool = False) -> Confinement | None:
    """What every input must resolve inside: SOURCE, or nothing with --follow-links (links followed anywhere)."""
    return None if follow_links else Confinement.of(source, "SOURCE", FOLLOW_LINKS)


def read_input(path: str, within: Confinement | None = None) -> bytes:
    """The bytes of one input file (at most IMAGE_MAX_BYTES); raises SkipImage, with droppos.files' reason,
    for anything else."""
    try:
        return files.read_input(path, "input", IMAGE_MAX_BYTES, within)
    except InputError as err:
        raise SkipImage(err.reason) from None


def is_text(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (os functions give them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def path_fields(path: str) -> dict[str, str]:
    """{"path": text} for a record; a name that is not valid UTF-8 gets U+FFFD for the bad bytes in
    `path` and its original bytes, base64, in `path_bytes`, so that it can still be found."""
    if is_text(path):
        return {"path": path}
    raw = os.fsencode(path)
    return {"path": raw.decode("utf-8", "replace"), "path_bytes": base64.b64encode(raw).decode("ascii")}


def skip_record(path: str, reason: str) -> dict[str, str]:
    """One skipped.jsonl line."""
    return {**path_fields(path), "reason": reason}


def describe(err: BaseException) -> str:
    """An exception in a few words: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
