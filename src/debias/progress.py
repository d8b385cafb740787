"""Progress of long jobs, for people and for logs: a rich bar on stderr when it is a terminal, else
one plain line at most every :data:`PERIOD` seconds (and one at the end) — what `dvc repro` in CI,
``| tee log`` or a batch scheduler's log file shows:

    sample@ddim 20 steps: 1536/2560 calls (60 %), 74.2/s, ETA 0:13

Every long job of the library takes a ``progress(done, total)`` callback; :class:`Progress` is one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

PERIOD = 10.0  # seconds between plain progress lines
Report = Callable[[int, int], None]  # what long jobs call: progress(done, total)


def clock(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """``with Progress("label", "calls") as progress: work(progress=progress)``.

    ``progress(done, total)`` (or :meth:`update` with a ``status`` such as the current loss) reports
    ``done`` of ``total`` units. ``enabled=False`` (other ranks, ``--no-progress``) reports nothing.
    """

    def __init__(self, label: str, unit: str = "", *, enabled: bool = True, period: float = PERIOD,
                 stream: TextIO | None = None):
        self.label, self.unit, self.enabled, self.period = label, unit, enabled, period
        self.stream = stream
        self.done, self.total, self.status = 0, None, ""
        self._bar = self._task = None
        self._began = self._first = self._last_line = self._reported = None

    def __enter__(self) -> Progress:
        stream = self.stream or sys.stderr
        if self.enabled and stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[status]}"), console=Console(file=stream), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=None, status="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and exc[0] is None and self._last_line is not None and self._reported != self.done:
            self._line()

    def __call__(self, done: int, total: int | None = None) -> None:
        self.update(done, total)

    def update(self, done: int, total: int | None = None, status: str | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._began is None:
            self._began, self._first, self._last_line, self._reported = now, done, now, done
        self.done, self.total = done, total if total is not None else self.total
        self.status = status if status is not None else self.status
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self.total, status=self.status)
        elif now - self._last_line >= self.period or (self.total is not None and done >= self.total):
            self._line(now)

    def _line(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = now - self._began
        rate = (self.done - self._first) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.done}/{self.total} {self.unit}".rstrip() if self.total else f"{self.done} {self.unit}".rstrip()]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f} %)"
        parts.append(f"{rate:.1f}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {clock((self.total - self.done) / rate)}")
        if self.status:
            parts.append(self.status)
        print(f"{self.label}: {', '.join(parts)}", file=self.stream or sys.stderr, flush=True)
        self._last_line, self._reported = now, self.done
