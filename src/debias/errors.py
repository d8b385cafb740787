"""The one exception type that reaches users as a single line, and the one handler that prints it.

Library code raises :class:`DebiasError` for anything a user can fix (bad config, missing file,
wrong checkpoint, an unknown solver or option). It is a ``ValueError``, so validation code needs no
translation layer between "a bad value" and "a user error". The CLI and the stage scripts print its
message as one line and exit with code 2 (:func:`one_line_errors`), and so do what the system refuses
(:func:`user_message`: a file operation, memory); every other exception is a bug and keeps its traceback.
A job stopped by SIGINT or SIGTERM after keeping its work raises :class:`Interrupted`: its one line says what is
kept and how to resume, and the exit code is 128 + the signal's number, as a shell reports a process it ended.
"""

import contextlib
import os
import sys
from collections.abc import Iterator


# every character str.splitlines() breaks at, shown escaped so that a message is always one line
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(text: str) -> str:
    """``text`` with its line breaks (e.g. from a file name, key or value) shown escaped."""
    return text.translate(_LINE_BREAKS)


def reports_errors() -> bool:
    """Whether this process prints user errors: rank 0 of a torchrun job (every rank exits with code 2),
    or a process outside torchrun."""
    return os.environ.get("RANK", "0") == "0"


class Interrupted(Exception):
    """A job that stopped on signal ``signum`` at a safe point; the message says what is kept and how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(one_line(message))
        self.signum = signum


class DebiasError(ValueError):
    """A user-facing error: the message names the problem in one line (line breaks that come from
    file names, keys or values are shown escaped)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


ALLOCATION_FAILURES = ("tried to allocate", "out of memory", "DefaultCPUAllocator", "can't allocate memory")


def user_message(err: BaseException) -> str | None:
    """The one line a user sees for ``err``, or None when it is a bug (and keeps its traceback): a
    DebiasError's message; an OSError (disk full, read-only, forbidden, a FIFO) with the path it names;
    running out of memory, from Python or from torch's allocator."""
    if isinstance(err, DebiasError):
        return str(err)
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        return one_line(f"{where}{err.strerror or err}")
    if isinstance(err, MemoryError):
        return "out of memory" + (f" ({one_line(str(err))[:200]})" if str(err) else "")
    if isinstance(err, RuntimeError) and any(text in str(err) for text in ALLOCATION_FAILURES):
        return one_line(str(err).strip().splitlines()[0])[:300]
    return None


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a user error (:func:`user_message`) into one line on stderr (from rank 0 under torchrun) and exit
    code 2 on every rank, an :class:`Interrupted` job into its line and 128 + its signal; a bug keeps its traceback."""
    try:
        yield
    except Interrupted as stop:
        if reports_errors():
            print(stop, file=sys.stderr)
        sys.exit(128 + stop.signum)
    except (DebiasError, OSError, MemoryError, RuntimeError) as err:
        message = user_message(err)
        if message is None:
            raise
        if reports_errors():
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
