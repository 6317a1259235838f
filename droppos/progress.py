"""The one progress reporter of every command (shard, training, eval-pos, feature extraction).

On a terminal: a rich bar on stderr. Elsewhere (SLURM, CI, a pipe: rich would print only the final
state), plain lines: one every `plain_every_s` seconds, or none when the caller writes its own log
lines (the training loop logs every --log-every steps). `log(line)` prints above the bar.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

PLAIN_EVERY_S = 15.0


class Progress:
    """Progress of `total` units (`unit`: steps, images, ...) from `start`; silent unless `enabled` (rank 0)."""

    def __init__(self, description: str, total: int, *, start: int = 0, unit: str = "steps", enabled: bool = True,
                 plain_every_s: Optional[float] = PLAIN_EVERY_S) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.done = start
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.plain_every_s = plain_every_s
        self._started, self._start = time.monotonic(), start
        self._last_line = self._started
        self._shown = start  # the units the last plain line reported
        self._bar = None
        if self.interactive:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=Console(stderr=True))
            self._task = self._bar.add_task(description, total=total, completed=start, status="")
            self._bar.start()

    def update(self, done: int, status: str = "") -> None:
        """`done` units so far (absolute)."""
        self.done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done, status=status)
        elif self.enabled and self.plain_every_s is not None and time.monotonic() - self._last_line >= self.plain_every_s:
            self.log(self._plain_line(status))
            self._shown = done

    def advance(self, n: int = 1, status: str = "") -> None:
        self.update(self.done + n, status)

    def log(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(line, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)
        self._last_line = time.monotonic()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif (self.enabled and self.plain_every_s is not None and self.done != self._shown
              and time.monotonic() - self._started >= self.plain_every_s):
            self.log(self._plain_line(""))  # a long job's last plain line says where it ended

    def rate(self) -> float:
        """Units per second since this reporter started (a resumed run's units before it do not count)."""
        return (self.done - self._start) / max(time.monotonic() - self._started, 1e-9)

    def _plain_line(self, status: str) -> str:
        rate = self.rate()
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        share = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        tail = f", {status}" if status else ""
        return (f"{self.description}: {self.done}/{self.total} {self.unit}{share}, {rate:,.1f} {self.unit}/s, "
                f"about {left:,.0f} s left{tail}")
