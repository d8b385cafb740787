"""SIGINT and SIGTERM as a request to stop at a safe point, so that a job keeps its work and can resume.

:class:`StopRequest`, while it is entered (in the main thread), turns the first SIGINT or SIGTERM into a
flag that the job polls where stopping loses nothing: the training loop after a step, sampling before each
network call (chunks on disk are complete files). A second signal aborts at once — the process dies of it;
every file is written atomically — unless it comes within :data:`ECHO_SECONDS` of the first: under torchrun
a terminal's Ctrl-C reaches every worker directly and again through the agent, which forwards it.

:class:`AgreedStop` makes the ranks of a torchrun job stop after the same step, whichever of them the signal
reached and when. After every step each rank posts its request (the signal's number, or 0) to an
asynchronous MAX all-reduce on a gloo group of its own — a few bytes on the CPU, never on the GPU's stream —
and then waits for the reduction it posted one step earlier, which has long completed. Every rank reads the
same reductions in the same order, so all stop after the same step: the one after the step during which the
first request arrived. The step loop gains no host-device sync; one process alone stops after the current step.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

from debias.runtime import Ranks

ECHO_SECONDS = 2.0  # a second signal this soon after the first is the same request (see the module docstring)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(Exception):
    """Raised by :meth:`StopRequest.check` at a safe point once signal ``signum`` asked the job to stop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """The first SIGINT/SIGTERM while entered, as ``signum`` (None until one arrives); the previous handlers
    come back on exit. Outside the main thread (where Python cannot handle signals) it never fires."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
        elif time.monotonic() - self._first > ECHO_SECONDS:  # a second request: die of the signal now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def check(self) -> None:
        """:class:`StopRequested` if a signal asked to stop."""
        if self.signum is not None:
            raise StopRequested(self.signum)


class AgreedStop:
    """Whether every rank stops after this step (see the module docstring): :meth:`after_step` on every rank after
    every step, :meth:`close` on every rank at the end. ``request`` is this process's :class:`StopRequest` (enter
    it around the steps); ``signum`` is the signal the ranks stopped for, once they agree to."""

    def __init__(self, ranks: Ranks):
        self.request = StopRequest()
        self.signum: int | None = None
        self.group = dist.new_group(backend="gloo") if ranks.world > 1 else None  # collective: every rank
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def after_step(self) -> bool:
        """Post this rank's request and read the ranks' agreement of one step ago (at once for one process)."""
        if self.group is None:
            self.signum = self.request.signum
            return self.signum is not None
        vote = torch.tensor(self.request.signum or 0, dtype=torch.int64)
        self.pending.append((dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group, async_op=True), vote))
        if len(self.pending) < 2:
            return False
        work, agreed = self.pending.pop(0)
        work.wait()
        self.signum = int(agreed) or None
        return self.signum is not None

    def close(self) -> None:
        """Wait for the reductions still in flight (every rank posted the same) and leave the gloo group."""
        for work, _ in self.pending:
            work.wait()
        self.pending = []
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
