"""Reading one input file safely, and naming it in records.

An input is read only when it is a regular file (a FIFO would block the read forever, a device
may never end) and, for --list entries, only when it resolves inside SOURCE. A name that is not
valid UTF-8 is still recorded: U+FFFD for the bad bytes in `path`, the original bytes in `path_bytes`.
"""

from __future__ import annotations

import base64
import os
import stat


class SkipImage(Exception):
    """An input that cannot become a sample; the message is the reason written to skipped.jsonl."""


def read_input(path: str, within: str | None = None) -> bytes:
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
        raise SkipImage(f"unreadable file: {err.strerror or describe(err)}") from None


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
