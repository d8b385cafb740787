"""Atomic file writing and the small table/JSON formats the pipeline exchanges.

Every output goes through :func:`atomic_write`: a temporary sibling, fsync, then ``os.replace``. A
killed process leaves either the previous complete file or the new complete file, never a torn one,
and two concurrent writers cannot interleave. Files get the permissions of a plain ``open``
(0666 less the umask: 0644 under umask 022), not ``mkstemp``'s private 0600.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from debias.errors import DebiasError


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write a file through ``write(fileobj)`` into a temporary sibling, fsync, then rename over ``path``.

    A failed write (disk full, read-only or forbidden folder, a file-size limit, torch's writer
    failing) removes the temporary file, leaves ``path`` as it was and is one DebiasError line naming it."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = write_failure(err)
        if reason is None:
            raise
        raise DebiasError(f"cannot write {path}: {reason}") from None


def write_failure(err: BaseException) -> str | None:
    """What went wrong, if ``err`` is a failed write rather than a bug: an OSError's reason, or the
    first line of torch's C++ writer error."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    if isinstance(err, RuntimeError) and ("PytorchStreamWriter" in str(err) or "file write failed" in str(err)):
        return "the write failed (disk full or a file-size limit?)"
    return None


def atomic_folder(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write a folder through ``write(folder)`` into a hidden sibling, then put it in place whole: a
    reader sees the earlier folder or the new one, never a part (a failure leaves the earlier one)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~current_umask())
        write(tmp)
        old = path.parent / f".{path.name}.{os.getpid()}.old.tmp"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        tmp = None
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, DebiasError):
            raise
        reason = write_failure(err)
        if reason is None:
            raise
        raise DebiasError(f"cannot write {path}: {reason}") from None


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_tsv(path: str | Path, records: Sequence[dict]) -> None:
    """A tab-separated table with a header row (the format `dvc plots` reads)."""
    buf = io.StringIO()
    if records:
        writer = csv.DictWriter(buf, fieldnames=list(records[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    write_text(path, buf.getvalue())


def read_tsv(path: str | Path) -> list[dict]:
    """Rows of a TSV written by :func:`write_tsv`, numbers converted to float."""
    with open(path, newline="") as f:
        return parse_tsv(f)


def parse_tsv(lines: Iterable[str]) -> list[dict]:
    """Rows of TSV text (an open file or lines), numbers converted to float."""
    def number(v: str) -> Any:
        try:
            return float(v)
        except ValueError:
            return v

    return [{k: number(v) for k, v in row.items()} for row in csv.DictReader(lines, delimiter="\t")]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, memoised on (path, size, mtime)."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(tensor: Any) -> str:
    """Hex sha256 of a tensor's dtype, shape and bytes."""
    array = tensor.detach().cpu().contiguous().numpy()
    digest = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()
