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
- `claim_output`: the one way out of every command that writes (shard, pretrain, finetune, probe,
  eval-pos, export): OUT kept apart from the command's inputs and from other commands' outputs, then
  `OutputLock`, then leftovers of a killed run cleaned up.
- `publish`: several files (or a folder) staged in a temporary folder and moved into place together:
  the previous good state stays whole until every new file is complete.
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
import shutil
import socket
import stat
import sys
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

from droppos import UserError

__all__ = [
    "LOCK_NAME", "OUTPUT_KINDS", "OutputError", "OutputLock", "Publication", "atomic_write", "claim_output", "command_kind",
    "file_sha256", "folder_kinds", "fsync_dir", "make_dirs", "output_error", "publish", "remove_stale_temporaries",
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
        _write_durably(tmp, write)
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


def _write_durably(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`path` (its folder made) written through `write(binary_file)` and fsynced: complete on disk when this returns."""
    make_dirs(path.parent)
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


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
    """Delete temporary files (and `publish`'s staging folders) that a killed process left in `folder`
    (call it while holding its lock). A folder is removed without following links inside it."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        if not (entry.name.startswith(".") and _TMP_MARK in entry.name):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
                removed += 1
            elif entry.is_symlink() or entry.is_file():  # a link goes itself, never what it points to
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
    in place on release (removing it would let two processes lock two different files), holding
    `{"command": ..., "released": ...}`: which command's output OUT is (`folder_kinds`).
    `check(previous_record)`, when given, runs once the lock is held and before the record is
    written: raising there leaves the file as it was.
    """

    def __init__(self, out: Path | str, command: str, check: Optional[Callable[[dict], None]] = None) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.command = command
        self.check = check
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
        if self.check is not None:
            try:
                self.check(previous)
            except BaseException:
                os.close(fd)
                raise
        if previous and "pid" in previous and previous.get("pid") != os.getpid():  # not a released record
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
        record = {"command": self.command, "released": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        with contextlib.suppress(OSError):  # no pid: nobody holds it; the command says what OUT is
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(record) + "\n").encode(), 0)
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
# The output guard: the one way out of every command that writes

#: The kind of output each command writes. A folder is one kind of output only: a command never writes
#: into another kind's folder (an eval-pos report into a training run, an export into a dataset, ...).
OUTPUT_KINDS = {"shard": "dataset", "pretrain": "run", "finetune": "run", "probe": "run", "eval-pos": "report",
                "export": "export"}
_KIND_NAMES = {"dataset": "a dataset", "run": "a training run", "report": "an eval-pos report folder",
               "export": "a folder of droppos exports"}
_CONFIG_MAX_BYTES = 64 << 20


def command_kind(command: str) -> Optional[str]:
    """The kind of output `command` ("eval-pos", "pretrain --export-only", ...) writes; None when unknown."""
    words = str(command).split()
    return OUTPUT_KINDS.get(words[0]) if words else None


def folder_kinds(folder: Path | str, record: Optional[dict] = None) -> dict[str, str]:
    """The kinds of output `folder` already is, each with the evidence that says so.

    How a folder's kind is known:
    - its lock file's record (`record`, else read from `folder/.droppos.lock` without following a link):
      the command holding it, or the last one that held it (a released lock keeps its `command`);
    - markers, for folders written before locks kept a record, or whose lock was removed or garbled:
      `manifest.json` or `.shard-progress.jsonl` (a dataset), `checkpoints/` or a `config.json` that is a run's
      record (`schedule`/`run_card`: a training run), `report.json` or `report.html` (an eval-pos report), a
      `config.json` with `architecture` (a timm export folder).
    A lock record of any other content (garbage, a JSON list, an unknown command) says nothing.
    """
    folder = Path(folder)
    kinds: dict[str, str] = {}
    if not folder.is_dir():
        return kinds
    if record is None:
        record = _peek_record(folder / LOCK_NAME)
    command = record.get("command")
    if isinstance(command, str) and command_kind(command) is not None:
        shown = command[:40].encode("ascii", "replace").decode()
        kinds[command_kind(command)] = f"its {LOCK_NAME} names `droppos {shown}`"

    def mark(kind: str, evidence: str) -> None:
        kinds.setdefault(kind, evidence)

    for name in ("manifest.json", ".shard-progress.jsonl"):
        if os.path.lexists(folder / name):
            mark("dataset", f"it holds {name}")
    if (folder / "checkpoints").is_dir():
        mark("run", "it holds checkpoints/")
    config = _peek_json(folder / "config.json")
    if isinstance(config, dict) and "architecture" in config:
        mark("export", "its config.json is a timm export's")
    elif isinstance(config, dict) and ("schedule" in config or "run_card" in config):
        mark("run", "its config.json is a training run's record")
    for name in ("report.json", "report.html"):
        if os.path.lexists(folder / name):
            mark("report", f"it holds {name}")
    return kinds


def _peek_record(path: Path) -> dict:
    """A lock file's record, read without following a link or blocking; {} for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return _read_record(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else {}
    except OSError:
        return {}
    finally:
        os.close(fd)


def _peek_json(path: Path) -> Any:
    """A marker file's JSON through the input opener; None when absent or unreadable."""
    if not os.path.lexists(path):
        return None
    try:
        return read_json_input(path, path.name, max_bytes=_CONFIG_MAX_BYTES)
    except UserError:
        return None


def _real(path: Path) -> Path:
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError, RuntimeError):  # a link loop, a NUL byte
        return Path(os.path.abspath(path))


def _relation(out: Path, other: Path) -> Optional[str]:
    if out == other:
        return "be"
    if out.is_relative_to(other):
        return "lie inside"
    if other.is_relative_to(out):
        return "contain"
    return None


def _check_apart(writes: Path, label: str, inputs: Iterable[tuple[str, Any]]) -> None:
    """`writes` is none of the inputs, lies inside none and contains none (compared resolved: links followed)."""
    real_out = _real(writes)
    for what, given in inputs:
        if given is None or str(given) == "":
            continue
        relation = _relation(real_out, _real(Path(given)))
        if relation is None:
            continue
        plain = _relation(Path(os.path.abspath(writes)), Path(os.path.abspath(given)))
        resolved = "" if plain == relation else f" (resolved: {real_out} and {_real(Path(given))})"
        raise UserError(f"{label} {writes} must not {relation} the input {what} {given}{resolved}: a command never "
                        "writes where it reads; give an output path apart from every input")


def _check_kind(folder: Path, kind: Optional[str], command: str, shown: str, record: Optional[dict] = None) -> None:
    """`folder` is no other kind of output than the one `command` writes."""
    if kind is None:
        return
    for other, evidence in folder_kinds(folder, record).items():
        if other != kind:
            raise UserError(f"{shown} is {_KIND_NAMES[other]} ({evidence}); `droppos {command.split()[0]}` writes "
                            f"{_KIND_NAMES[kind]}, never into another command's output: give another path")


@contextlib.contextmanager
def claim_output(out: Path | str, command: str, inputs: Iterable[tuple[str, Any]] = (), *,
                 writes: Optional[Path | str] = None, label: str = "--out", lock: bool = True,
                 check: Optional[Callable[[], None]] = None) -> Iterator[Optional[OutputLock]]:
    """The one way out: every command that writes holds this for as long as it writes into `out`.

    `out` is the folder the command writes into and locks: a run, a dataset, a report folder, or for `export` the
    folder that receives the .pth file or the timm folder. `writes` (default `out`) is what the user named (the
    .pth file, the timm folder). `inputs` are `(option, path)` pairs: everything the command reads. In order:
    1. `writes` must not be, lie inside or contain any input (resolved: links followed): one line naming both;
    2. `out` (and `writes`, when it is an existing folder of its own) must not be another kind of command's output
       (`folder_kinds`: the lock's record, kept after release, then marker files): one line naming it and why;
    3. `check()`, the command's own last word (export: what is at --out is a previous export it may replace);
    4. `OutputLock(out, command)` (never through a link, a regular file, any record tolerated, one holder; the
       kind is checked again under the lock, before the record is written, and `check()` once it is held);
       `lock=False` (a training node other than the first) does 1 to 3 only;
    5. under the lock: temporaries a killed run left are removed (`remove_stale_temporaries`) and a publication
       it interrupted is rolled back (`publish`), so the previous good state is what the command starts from.
    Nothing is created before 1 to 3 pass. Yields the lock (None when `lock` is False).
    """
    out = Path(out)
    writes = out if writes is None else Path(writes)
    kind = command_kind(command)
    _check_apart(writes, label, list(inputs))
    shown = f"{label} {writes}" if writes == out else f"{out} (where {label} {writes} goes)"
    _check_kind(out, kind, command, shown)
    if writes != out and writes.is_dir():
        _check_kind(writes, kind, command, f"{label} {writes}")
    if check is not None:
        check()
    if not lock:
        yield None
        return
    with OutputLock(out, command, check=lambda record: _check_kind(out, kind, command, shown, record)) as guard:
        if check is not None:
            check()
        remove_stale_temporaries(out)
        _recover(out)
        yield guard


# ---------------------------------------------------------------------------------------------
# Publishing several files together

_PUBLISH = ".droppos-publish"  # staging: `.droppos-publish.tmp-PID` (a temporary); committing: `.droppos-publish.journal`
_JOURNAL = _PUBLISH + ".journal"


class Publication:
    """Files (or folders of files) staged in `FOLDER/.droppos-publish.tmp-PID/new/`, for `publish` to move into place."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.staging = self.folder / f"{_PUBLISH}{_TMP_MARK}{os.getpid()}"
        self.entries: list[str] = []  # the top-level names written, in order

    def write(self, name: str, write: Callable[[IO[bytes]], Any]) -> Path:
        """Stage `name` (a file name, or `folder/file`) through `write(binary_file)`; returns where it will be.
        An OSError (a full disk) becomes an `OutputError` naming the final path."""
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or any(p in (".", "..") for p in parts) \
                or parts[0] in (LOCK_NAME, _JOURNAL) or parts[0].startswith(_PUBLISH):
            raise ValueError(f"not a name to publish: {name!r}")
        path = self.staging / "new" / name
        try:
            _write_durably(path, write)
        except BaseException as err:
            os_err = _os_error_in(err)
            if os_err is not None:
                raise output_error(os_err, self.folder / name) from None
            raise
        if parts[0] not in self.entries:
            self.entries.append(parts[0])
        return self.folder / name

    def write_bytes(self, name: str, data: bytes) -> Path:
        return self.write(name, lambda handle: handle.write(data))

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any, indent: int = 1) -> Path:
        return self.write_text(name, json_text(obj, indent=indent) + "\n")

    def _commit(self, owns: Sequence[str]) -> None:
        """Move every staged entry into place; entries of `owns` not written again go. All or nothing."""
        new = self.staging / "new"
        for root, dirs, _ in os.walk(new):
            for name in dirs:
                fsync_dir(Path(root) / name)
        fsync_dir(new)
        stale = [n for n in dict.fromkeys(owns) if n not in self.entries and _plain(n) and os.path.lexists(self.folder / n)]
        plan = {"entries": self.entries, "stale": stale}
        journal = self.folder / _JOURNAL
        try:
            with open(self.staging / "plan.json", "wb") as handle:
                handle.write((json.dumps(plan) + "\n").encode())
                handle.flush()
                os.fsync(handle.fileno())
            os.mkdir(self.staging / "old")
            fsync_dir(self.staging)
            os.rename(self.staging, journal)  # from here on, a crash is rolled back by the next claim_output
            fsync_dir(self.folder)
        except OSError as err:
            raise output_error(err, self.folder / (self.entries[0] if self.entries else "")) from None
        name = ""
        try:
            for name in self.entries:
                target = self.folder / name
                if os.path.lexists(target):
                    os.replace(target, journal / "old" / name)
                os.replace(journal / "new" / name, target)
            for name in stale:
                os.replace(self.folder / name, journal / "old" / name)
        except BaseException as err:
            _roll_back(self.folder, journal, plan)
            os_err = _os_error_in(err)
            if os_err is not None:
                raise output_error(os_err, self.folder / name) from None
            raise
        fsync_dir(self.folder)
        with contextlib.suppress(OSError):  # done: the journal is now a temporary like any other
            os.rename(journal, self.staging)
            shutil.rmtree(self.staging)


def _plain(name: object) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def _roll_back(folder: Path, journal: Path, plan: dict) -> bool:
    """Put back what a publication replaced, take out what it added; True when the journal could go."""
    entries, stale = list(plan["entries"]), list(plan["stale"])
    whole = True
    for name in reversed(entries + stale):
        old, target = journal / "old" / name, folder / name
        try:
            if os.path.lexists(old):
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)  # a folder moved in (os.replace cannot replace a non-empty one)
                os.replace(old, target)
            elif name in entries and not os.path.lexists(journal / "new" / name) and os.path.lexists(target):
                _remove(target)  # moved in, replacing nothing
        except OSError:
            whole = False
    if whole:
        fsync_dir(folder)
        with contextlib.suppress(OSError):
            shutil.rmtree(journal)
    return whole


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _recover(folder: Path) -> None:
    """Roll back a publication that a killed process left half moved (called under the folder's lock)."""
    journal = folder / _JOURNAL
    if not os.path.lexists(journal):
        return
    if os.path.islink(journal) or not os.path.isdir(journal):
        raise UserError(f"{journal} is not droppos's (not a folder); remove it")
    try:
        plan = read_json_input(journal / "plan.json", "publication record", max_bytes=1 << 20)
    except UserError:
        plan = None
    if not (isinstance(plan, dict) and all(isinstance(plan.get(k), list) and all(_plain(n) for n in plan[k])
                                           for k in ("entries", "stale"))):
        raise UserError(f"{journal} holds no readable publication record; move it away (it may hold the previous "
                        "files) and re-run")
    if not _roll_back(folder, journal, plan):
        raise UserError(f"{folder}: an interrupted publication could not be rolled back; the previous files are in "
                        f"{journal / 'old'}")
    print(f"droppos: {folder}: rolled back a publication a stopped run left half done; the previous files are back",
          file=sys.stderr)


@contextlib.contextmanager
def publish(folder: Path | str, owns: Iterable[str] = ()) -> Iterator[Publication]:
    """Files that appear together or not at all (call it under `claim_output(folder, ...)`).

        with publish(out, owns=previous_report_files) as staged:
            staged.write_bytes("figure.png", png)
            staged.write_json("report.json", report)

    Every file is written into a temporary folder inside `folder` and fsynced; when the block ends normally the
    entries are moved into place, each previous one set aside in a journal first, and names of `owns` that were
    not written again are set aside too (a previous run's files that this one does not have). When all moves
    are done the journal goes. Any failure (a full disk while staging, an error in the block, a failed move)
    leaves `folder` as it was and no temporary behind; a kill during the moves is rolled back by the next
    `claim_output` of `folder`, and a kill while staging leaves a temporary that it removes.
    """
    publication = Publication(folder)
    try:
        try:
            make_dirs(publication.staging / "new")
        except OSError as err:
            raise output_error(err, publication.folder, "create the output directory") from None
        yield publication
        publication._commit(list(owns))
    finally:
        if os.path.lexists(publication.staging):
            with contextlib.suppress(OSError):
                shutil.rmtree(publication.staging)



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
