"""Helpers of the tests that kill a sampling process after a chosen amount of progress."""

import signal
import subprocess
import time
from pathlib import Path


def chunk_names(folder: Path) -> set[str]:
    """The finished chunk files in ``folder`` (none when it does not exist)."""
    return {p.name for p in folder.glob("*.npz")}


def kill_at_chunks(proc: subprocess.Popen, folders: list[Path], count: int) -> None:
    """SIGKILL ``proc`` once ``folders`` hold ``count`` finished chunks between them (at once if it ends first)."""
    while proc.poll() is None and sum(len(chunk_names(f)) for f in folders) < count:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
