"""Run the `droppos` CLI inside the test process, as `python -m droppos ...` would run it.

A fresh `python -m droppos` costs about six seconds of imports (torch, timm) before it does anything; the
suite runs the CLI a few hundred times. Tests that need a process of their own (signals, kill -9, a
second writer, several ranks, fault injection through the environment) start one; the rest call this.
The result has the fields of `subprocess.CompletedProcess` (returncode, stdout, stderr).
"""

from __future__ import annotations

import contextlib
import io
import subprocess


def droppos(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`droppos ARGS` in this process: its exit status and what it wrote to stdout and stderr."""
    import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(list(args))
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                print(stop.code, file=err)
    return subprocess.CompletedProcess(["droppos", *args], code, out.getvalue(), err.getvalue())


def process(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`python -m droppos ARGS` in a process of its own: for several ranks, signals, or a fresh interpreter."""
    import sys

    return subprocess.run([sys.executable, "-m", "droppos", *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)
