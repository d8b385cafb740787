"""Advisory file locks (``flock``) that a job keeps across ``exec`` and loses only when it ends.

A job may replace itself by torchrun (:func:`debias.runtime.relaunch_on_all_gpus`); a lock held by an
inheritable descriptor stays with the process through that ``exec``, and the kernel releases it when
the last process holding the descriptor ends, however it ends (SIGKILL included). Two processes lock
the same file exclusively only one at a time, whichever workspace of the project they run in.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def lock_file(path: Path, wait: bool) -> int | None:
    """An exclusive lock on ``path`` (created with its folder if missing): its descriptor, inheritable across
    ``exec``, to be released with ``os.close``; or None when another process holds it and not ``wait``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.set_inheritable(fd, True)
    return fd
