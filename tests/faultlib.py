"""Fault injection: make file operations under a path fail with a chosen OSError, in this process
or in a subprocess (`python -m droppos ...`). Portable: no mount, no root needed, and it works as
root too (where chmod stops nothing).

    fault = Fault("write", out, "ENOSPC", after=200_000)   # a disk that fills after 200 kB
    subprocess.run([sys.executable, "-m", "droppos", ...], env=faultlib.env(fault))
    with faultlib.inject(Fault("list", source / "train" / "a")):   # the same, in this process
        ...

Operations (`op`), each for paths equal to or below `path` (compared as absolute, unresolved paths):
- "write": opening a file for writing (`open`/`io.open` modes w, a, x, +; `os.open` with a write
  or create flag), `os.mkdir`, and `os.replace`/`os.rename` onto the path fail with `errno`.
  With `after=N`, opening succeeds and the first N bytes written (by this process, to files
  opened under the path; `os.write`/`os.pwrite` on `os.open`ed descriptors count too) go
  through; every write after that fails: a disk that fills up.
- "read": opening a file for reading fails (an unreadable file, also for root).
- "list": `os.scandir` and `os.listdir` fail (a folder that cannot be listed).

How: `env()` puts tests/faults/ first on PYTHONPATH; its sitecustomize.py calls `install_from_env()`
at interpreter start-up, before any module takes references to `open`, so modules that hold
`builtins.open` (tarfile) see the patched one. Worker processes inherit the patches (fork) or the
environment (spawn). `inject()` patches this process only, where code that captured `open`
before it was called keeps the real one; it is for code that calls `open`/`os.*` at run time.
Writes made by C code that bypasses Python's io (e.g. torch.save given a path, not a file
object) are not seen.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno as errno_codes
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

ENV = "DROPPOS_FAULTS"
FAULTS_DIR = Path(__file__).resolve().parent / "faults"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


@dataclasses.dataclass
class Fault:
    """One rule: `op` ("write", "read", "list") under `path` fails with `errno` (a name such as "ENOSPC")."""

    op: str
    path: str | Path
    errno: str = "EACCES"
    after: Optional[int] = None  # "write" only: bytes allowed through before writes fail

    def __post_init__(self) -> None:
        if self.op not in ("write", "read", "list"):
            raise ValueError(f"unknown fault op {self.op!r}")
        if not hasattr(errno_codes, self.errno):
            raise ValueError(f"unknown errno name {self.errno!r}")
        self.path = os.path.abspath(os.fspath(self.path))

    def error(self, path: object) -> OSError:
        code = getattr(errno_codes, self.errno)
        return OSError(code, os.strerror(code), os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else None)

    def covers(self, path: object) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        target = os.path.abspath(os.fsdecode(path))
        return target == self.path or target.startswith(self.path.rstrip(os.sep) + os.sep)


def env(*faults: Fault, base: Optional[dict] = None) -> dict:
    """An environment for a subprocess that applies `faults` (and imports this checkout's droppos)."""
    environ = dict(os.environ if base is None else base)
    repo = str(FAULTS_DIR.parents[1])
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAULTS_DIR), repo, environ.get("PYTHONPATH")) if p)
    environ[ENV] = json.dumps([dict(dataclasses.asdict(f), path=str(f.path)) for f in faults])
    return environ


def install_from_env() -> None:
    """Apply the faults named in $DROPPOS_FAULTS (called by tests/faults/sitecustomize.py)."""
    rules = json.loads(os.environ.get(ENV) or "[]")
    if rules:
        _install([Fault(**rule) for rule in rules])


@contextlib.contextmanager
def inject(*faults: Fault) -> Iterator[None]:
    """Apply `faults` in this process for the duration of the block."""
    restore = _install(list(faults))
    try:
        yield
    finally:
        restore()


# ---------------------------------------------------------------------------------------------
# The patches


class _Budget:
    """Bytes a "write ... after=N" fault still lets through (one per fault, per process)."""

    def __init__(self, fault: Fault):
        self.fault = fault
        self.left = fault.after or 0

    def spend(self, size: int, path: object) -> None:
        if size > self.left:
            self.left = 0
            raise self.fault.error(path)
        self.left -= size


def _install(faults: list[Fault]) -> Callable[[], None]:
    """Patch open/os for `faults`; returns the function that puts the real ones back."""
    real = {"open": builtins.open, "io_open": io.open, "os_open": os.open, "mkdir": os.mkdir, "replace": os.replace,
            "rename": os.rename, "scandir": os.scandir, "listdir": os.listdir, "write": os.write, "pwrite": os.pwrite}
    budgets = {id(f): _Budget(f) for f in faults if f.op == "write" and f.after is not None}
    fd_budgets: dict[int, _Budget] = {}

    def matching(op: str, path: object, with_budget: bool = False) -> list[Fault]:
        return [f for f in faults if f.op == op and f.covers(path) and ((f.after is not None) == with_budget)]

    def check(op: str, path: object) -> None:
        for fault in matching(op, path):
            raise fault.error(path)

    class FaultyFileIO(io.FileIO):
        budget: _Budget

        def write(self, data) -> int:
            self.budget.spend(memoryview(data).nbytes, self.name)
            return super().write(data)

    def patched_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
        writing = any(c in mode for c in "wax+")
        check("write" if writing else "read", file)
        budgeted = matching("write", file, with_budget=True) if writing else []
        if not budgeted:
            return real["io_open"](file, mode, buffering, encoding, errors, newline, closefd, opener)
        raw = FaultyFileIO(file, mode.replace("b", "").replace("t", ""), closefd, opener)
        raw.budget = budgets[id(budgeted[0])]
        if buffering == 0:
            return raw
        size = buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE
        buffered = io.BufferedRandom(raw, size) if "+" in mode else io.BufferedWriter(raw, size)
        if "b" in mode:
            return buffered
        return io.TextIOWrapper(buffered, encoding, errors, newline, line_buffering=buffering == 1)

    def patched_os_open(path, flags, mode=0o777, *, dir_fd=None):
        writing = bool(flags & _WRITE_FLAGS)
        check("write" if writing else "read", path)
        fd = real["os_open"](path, flags, mode, dir_fd=dir_fd)
        budgeted = matching("write", path, with_budget=True) if writing else []
        if budgeted:
            fd_budgets[fd] = budgets[id(budgeted[0])]
        else:
            fd_budgets.pop(fd, None)
        return fd

    def patched_write(fd, data):
        if fd in fd_budgets:
            fd_budgets[fd].spend(len(data), None)
        return real["write"](fd, data)

    def patched_pwrite(fd, data, offset):
        if fd in fd_budgets:
            fd_budgets[fd].spend(len(data), None)
        return real["pwrite"](fd, data, offset)

    def patched_mkdir(path, mode=0o777, *, dir_fd=None):
        check("write", path)
        return real["mkdir"](path, mode, dir_fd=dir_fd)

    def moving(name):
        def patched(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            check("write", dst)
            return real[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return patched

    def listing(name):
        def patched(path="."):
            check("list", path)
            return real[name](path)
        return patched

    builtins.open = io.open = patched_open
    os.open, os.write, os.pwrite, os.mkdir = patched_os_open, patched_write, patched_pwrite, patched_mkdir
    os.replace, os.rename = moving("replace"), moving("rename")
    os.scandir, os.listdir = listing("scandir"), listing("listdir")

    def restore() -> None:
        builtins.open, io.open = real["open"], real["io_open"]
        os.open, os.write, os.pwrite, os.mkdir = real["os_open"], real["write"], real["pwrite"], real["mkdir"]
        os.replace, os.rename, os.scandir, os.listdir = real["replace"], real["rename"], real["scandir"], real["listdir"]

    return restore
