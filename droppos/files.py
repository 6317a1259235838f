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
import math
import os
import socket
import stat
import sys
from pathlib import Path
from typing import IO, Any, Callable, NamedTuple, Optional

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


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], Any], keep_previous: Optional[Path] = None) -> Path:
    """Write `path` through `write(binary_file)` atomically; an OSError becomes an `OutputError`.

    The temporary file is removed whatever goes wrong (also on KeyboardInterrupt), and `path`
    keeps its previous content until the new one is complete and durable. `keep_previous`: the
    previous content moves there (replacing what was there) just before the new one takes its place.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        make_dirs(path.parent)
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
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


def json_text(obj: Any, indent: Optional[int] = None, sort_keys: bool = False) -> str:
    """Strict JSON (what every reader parses): a non-finite float, which JSON cannot hold, is written as null."""
    return json.dumps(_finite(obj), indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json_atomic(path: Path | str, obj: Any, indent: int = 1) -> Path:
    """JSON (UTF-8, a final newline, strict: `json_text`) written atomically."""
    return write_text_atomic(path, json_text(obj, indent=indent) + "\n")


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
    except (ProcessLookupError, OverflowError, ValueError):
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
            # Never through a link (a planted OUT/.droppos.lock -> any file would be truncated), never blocking.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UserError(f"{self.path} is a symbolic link, not droppos's lock file; remove it") from None
            raise output_error(err, self.out, "create the output directory" if not self.out.is_dir() else "lock") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise UserError(f"{self.path} is {not_regular_reason(mode).split(',')[0]}, not droppos's lock file; "
                            "remove it")
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
            pid = previous.get("pid")
            if previous.get("host") == socket.gethostname() and not (isinstance(pid, int) and 0 < pid and _pid_alive(pid)):
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
    """Who holds a lock, from its record (which may hold anything: only short printable values are shown)."""
    if not record:
        return "another process"
    shown = {key: str(record.get(key, "?"))[:80].encode("ascii", "replace").decode() for key in
             ("command", "pid", "host", "since")}
    return f"`droppos {shown['command']}` (pid {shown['pid']} on {shown['host']}, since {shown['since']})"


# ---------------------------------------------------------------------------------------------
# The one way in: every file a user, a manifest, a list or a sidecar names is opened here
#
# `read_input` (bytes) and `regular_file` (a stat) are the only doors: regular files only (a FIFO or a device
# is never opened), names the system can take, a size bound, and with a `Confinement` nothing that resolves
# outside a folder (checked before opening and, where the system tells, on what was opened). Each refusal is
# an `InputError` whose `reason` is the same words wherever it is met: a one-line error for a file a user
# names, a skip reason for one input among many (the shard stage's skipped.jsonl).


NAME_MAX = 255  # bytes in one path component (Linux, macOS and most file systems)
PATH_MAX = 4096  # bytes in a path given to the system, its final NUL included (Linux)


def name_too_long(path: Path | str) -> Optional[str]:
    """Why the system would refuse `path` as too long (a component over NAME_MAX bytes, or the whole over
    PATH_MAX), or None: checked before any system call, so that the reason is the same everywhere."""
    raw = os.fsencode(path)
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if longest > NAME_MAX:
        return f"name too long: a name of {longest:,} bytes (at most {NAME_MAX})"
    if len(raw) >= PATH_MAX:
        return f"name too long: a path of {len(raw):,} bytes (at most {PATH_MAX - 1:,})"
    return None


def not_regular_reason(mode: int) -> Optional[str]:
    """Why a file of this st_mode is not an input (None: a regular file). Never opened: opening a FIFO blocks
    until a writer appears, and a device may read forever."""
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


def _os_reason(err: OSError, path: Path | str) -> str:
    """An OSError met while looking at or opening an input, as a skip reason."""
    if isinstance(err, FileNotFoundError):
        return "broken symlink (its target does not exist)" if os.path.islink(path) else "file not found"
    if err.errno == errno.ENAMETOOLONG:
        return f"name too long: {err.strerror}: not read"
    if err.errno == errno.ELOOP:
        return "a symlink loop: not read"
    return f"unreadable file: {err.strerror or type(err).__name__}"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class Confinement(NamedTuple):
    """The folder inputs must stay in once links are resolved: `root` (resolved), `name` (how reasons call it)
    and `admit` (what a user can do to admit a file outside it). Picklable: workers get it with their task."""

    root: str
    name: str = "its folder"
    admit: str = ""

    @classmethod
    def of(cls, folder: Path | str, name: str = "its folder", admit: str = "") -> "Confinement":
        return cls(os.path.realpath(folder), name, admit)

    def holds(self, path: Path | str) -> bool:
        """Whether `path`, its links resolved, lies in `root`."""
        return _inside(os.path.realpath(path), self.root)

    @property
    def outside(self) -> str:
        """The reason for a path that resolves outside."""
        return f"resolves outside {self.name} through a symlink: not read" + (f" ({self.admit})" if self.admit else "")


class InputError(UserError):
    """A named input that cannot be read as it must: `reason` says why, for a skip record."""

    def __init__(self, what: str, path: Path | str, reason: str) -> None:
        super().__init__(f"{what} {str(path)[:300]}: {reason}")
        self.path, self.reason = path, reason


def regular_file(path: Path | str, what: str = "file", within: Optional[Confinement] = None) -> os.stat_result:
    """Refuse anything but a regular file (links followed) without opening it: opening a FIFO blocks, and a
    device reads forever. Long names, NUL bytes, loops, permissions and, with `within`, a path resolving
    outside that folder, are one `InputError` each (its `reason` is the skip reason)."""
    problem = name_too_long(path)
    if problem is not None:
        problem += ": not read"
    elif "\0" in os.fsdecode(path):
        problem = "a NUL byte in its name: not read"
    if problem is None and within is not None and not within.holds(path):
        problem = within.outside
    if problem is not None:
        raise InputError(what, path, problem)
    try:
        status = os.stat(path)
    except OSError as err:
        raise InputError(what, path, _os_reason(err, path)) from None
    problem = not_regular_reason(status.st_mode)
    if problem is not None:
        raise InputError(what, path, problem)
    return status


def read_input(path: Path | str, what: str, max_bytes: int, within: Optional[Confinement] = None) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (and, with `within`, inside that folder once links are
    resolved), opened without blocking on a FIFO swapped in after the check, and checked again once open (what
    was opened, where the system says so); anything else is a one-line `InputError` whose `reason` says why."""
    regular_file(path, what, within)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise InputError(what, path, _os_reason(err, path)) from None
    try:
        status = os.fstat(fd)
        problem = not_regular_reason(status.st_mode)  # replaced between the check and the open
        if problem is None and within is not None:
            opened = _opened_path(fd)
            if opened is not None and not _inside(opened, within.root):
                problem = within.outside
        if problem is None and status.st_size > max_bytes:
            problem = f"too large: {status.st_size:,} bytes, more than the {max_bytes:,} it may be; refused"
        if problem is not None:
            raise InputError(what, path, problem)
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise InputError(what, path, f"too large: grew past the {max_bytes:,} bytes it may be; refused")
        return b"".join(chunks)
    except OSError as err:
        raise InputError(what, path, _os_reason(err, path)) from None
    finally:
        os.close(fd)


def _opened_path(fd: int) -> Optional[str]:
    """The resolved path of an open file where the system tells it (Linux), else None: a link swapped after the
    confinement check is caught here."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


JSON_MAX_DEPTH = 32  # every JSON file the project reads is a few levels deep


def parse_json(data: bytes, where: str, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """Strict JSON of bounded nesting (checked before parsing: deep nesting is a RecursionError in `json`);
    NaN and Infinity literals refused."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{where} is not UTF-8 text (byte {err.start}); refused") from None
    if _json_depth(text) > max_depth:
        raise UserError(f"{where} nests deeper than {max_depth} levels; refused")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as err:
        raise UserError(f"{where} is not valid JSON: {str(err)[:160]}") from None


def read_json_input(path: Path | str, what: str, max_bytes: int = 64 << 20, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """A JSON file a user or another file names: `read_input`'s guarantees, then `parse_json`'s."""
    return parse_json(read_input(path, what, max_bytes), f"{what} {path}", max_depth)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
