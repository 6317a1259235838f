"""What every stage does with the files it writes: atomic replacement, one writer per output
directory, and OS errors turned into one line.

Torch-free, so that the CLI, the shard stage and its worker processes can import it cheaply.

- `atomic_write` (and its bytes/text/JSON forms): a temporary file beside the target, fsync,
  rename, fsync of the folder. Readers see the old file or the new one, never half of one; on any
  failure the temporary file is removed and the old file is left as it was.
- `OutputLock`: an exclusive `flock` on `OUT/.droppos.lock` for as long as a stage runs. A second
  process on the same OUT stops with one line naming the holder (command, pid, host, since when).
  The kernel drops the lock of a process that dies, so a lock left by a killed run is simply taken
  over (and said so).
- `output_error`: an OSError (full disk, read-only file system, permission, a parent that is a
  file) as a `UserError` naming the path, the cause and what to do.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import IO, Any, Callable, Optional

from droppos import UserError

__all__ = [
    "LOCK_NAME", "OutputError", "OutputLock", "atomic_write", "file_sha256", "fsync_dir", "make_dirs", "output_error", "remove_stale_temporaries",
    "write_bytes_atomic", "write_json_atomic", "write_text_atomic",
]

LOCK_NAME = ".droppos.lock"
_TMP_MARK = ".tmp-"  # temporary files are `.{name}.tmp-{pid}` beside their target

# What a user can do about an OS error, by errno (the rest get the OS's own words only).
_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose another output directory, then re-run to continue",
    errno.EDQUOT: "the disk quota is exhausted: free space, then re-run to continue",
    errno.EROFS: "the file system is read-only: choose another output directory",
    errno.EACCES: "permission denied: choose an output directory you can write to",
    errno.EPERM: "operation not permitted: choose an output directory you can write to",
    errno.ENOTDIR: "a parent of it is a file, not a directory: choose another path",
    errno.EISDIR: "it is a directory: give a file path",
    errno.ENAMETOOLONG: "the path is too long",
}


class OutputError(UserError):
    """Writing an output failed for a reason outside the program (disk, permissions, paths)."""


def output_error(err: OSError, path: Path | str, doing: str = "write") -> OutputError:
    """`err` as one line: what could not be done to which path, the OS's reason, and what to do."""
    reason = err.strerror or type(err).__name__
    hint = _HINTS.get(err.errno or 0)
    return OutputError(f"cannot {doing} {path}: {reason}" + (f" ({hint})" if hint else ""))


def fsync_dir(directory: Path | str) -> None:
    """Make renames inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(folder: Path | str) -> Path:
    """`mkdir -p`, where an ancestor that is a file is reported as ENOTDIR (mkdir says EEXIST)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)) from None
    return folder


def temporary_path(path: Path) -> Path:
    """The temporary name `atomic_write` uses for `path` in this process."""
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write `path` through `write(binary_file)` atomically; an OSError becomes an `OutputError`.

    The temporary file is removed whatever goes wrong (also on KeyboardInterrupt), and `path`
    keeps its previous content until the new one is complete and durable.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        make_dirs(path.parent)
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        os_err = _os_error_in(err)
        if os_err is not None:
            raise output_error(os_err, path) from None
        raise
    fsync_dir(path.parent)
    return path


def _os_error_in(err: BaseException) -> Optional[OSError]:
    """The OSError behind `err`: itself, or the one a library (torch.save, safetensors) wrapped."""
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file's bytes (read in chunks)."""
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def write_text_atomic(path: Path | str, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, obj: Any, indent: int = 1) -> Path:
    """JSON (UTF-8, a final newline) written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def remove_stale_temporaries(folder: Path | str) -> int:
    """Delete temporary files that a killed process left in `folder` (call it while holding its lock)."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        if entry.name.startswith(".") and _TMP_MARK in entry.name and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed += 1
    return removed


# ---------------------------------------------------------------------------------------------
# One writer per output directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive lock on an output directory for the life of a stage (a context manager).

    The lock is `flock` on `OUT/.droppos.lock`, whose content says who holds it. The file is left
    in place (emptied) on release: removing it would let two processes lock two different files.
    """

    def __init__(self, out: Path | str, command: str) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.command = command
        self._fd: Optional[int] = None
        self.took_over: Optional[dict] = None  # the record of a dead holder this lock replaced

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            make_dirs(self.out)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise output_error(err, self.out, "create the output directory" if not self.out.is_dir() else "lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            raise UserError(f"{self.out} is in use by {_describe_holder(holder)}; wait for it to finish, "
                            "or give another output directory") from None
        except OSError as err:  # a file system without locks: carry on unlocked, but say so
            print(f"droppos: warning: cannot lock {self.path} ({err.strerror}); make sure no other run writes "
                  f"to {self.out}", file=sys.stderr)
        previous = _read_record(fd)
        if previous and previous.get("pid") != os.getpid():
            self.took_over = previous
            if previous.get("host") == socket.gethostname() and not _pid_alive(int(previous.get("pid", 0) or 0)):
                print(f"droppos: {self.out}: taking over the lock left by {_describe_holder(previous)}, which is no "
                      "longer running", file=sys.stderr)
        record = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            raise output_error(err, self.path) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _read_record(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
        record = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe_holder(record: dict) -> str:
    if not record:
        return "another process"
    return (f"`droppos {record.get('command', '?')}` (pid {record.get('pid', '?')} on {record.get('host', '?')}, "
            f"since {record.get('since', '?')})")
