"""``.npz`` files with bounded memory: headers read (and checked against the file) before any data,
members memory-mapped, and arrays written as a stream of blocks.

An ``.npz`` is a zip of ``.npy`` members. :func:`members` reads only their headers; a member stored
uncompressed (as ``np.savez`` writes) is then a contiguous run of bytes in the file, which
:func:`open_member` maps read-only — so reading 16 images of a 50 000-image file touches 16 images.
A compressed member may inflate to at most :data:`INFLATE_LIMIT` times its size (more is refused as
a decompression bomb before any is inflated) and is inflated only as far as the rows asked for. :func:`write_npz`
writes members block by block (bounded by the block size), uncompressed, with fixed timestamps, so the
same arrays always give the same bytes.
"""

from __future__ import annotations

import math
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from debias.errors import DebiasError
from debias.io import atomic_write

_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field
INFLATE_LIMIT = 100  # real images deflate 2-5x (digits: 2.5x); a 1000x member is a bomb (all zeros)
_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Member:
    """One ``.npy`` member: its shape and dtype, and where its data starts (None when compressed)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def members(path: str | Path) -> dict[str, Member]:
    """The arrays of an ``.npz`` by name (without ``.npy``), from their headers alone. Object arrays,
    Fortran order and data that the file is too short to hold are one DebiasError line."""
    path = Path(path)
    if not path.is_file():
        raise DebiasError(f"no such file: {path}")
    found = {}
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read_header(f)
                    header = f.tell()
                name = info.filename[:-len(".npy")]
                if dtype.hasobject or fortran:
                    raise DebiasError(f"{path}: array {name!r} holds Python objects or is in Fortran order; "
                                      "only plain numeric arrays are read")
                member = Member(name, tuple(shape), dtype, None)
                if info.compress_type == zipfile.ZIP_STORED:
                    raw.seek(info.header_offset + 26)
                    name_len, extra_len = struct.unpack("<HH", raw.read(4))
                    start = info.header_offset + _LOCAL_HEADER + name_len + extra_len + header
                    if start + member.nbytes > size or info.file_size != header + member.nbytes:
                        raise DebiasError(f"{path}: array {name!r} declares {member.nbytes} bytes of data that "
                                          "the file does not hold (truncated or forged)")
                    member = Member(name, tuple(shape), dtype, start)
                elif info.file_size != header + member.nbytes:
                    raise DebiasError(f"{path}: array {name!r} declares {member.nbytes} bytes of data but holds "
                                      f"{info.file_size - header} (forged header)")
                elif member.nbytes > INFLATE_LIMIT * info.compress_size + (1 << 20):
                    raise DebiasError(f"{path}: array {name!r} would inflate {member.nbytes / 2**20:.0f} MiB from "
                                      f"{info.compress_size / 2**20:.1f} MiB (a decompression bomb?); refusing it — "
                                      "save real data uncompressed (np.savez) to have it memory-mapped")
                found[name] = member
    except DebiasError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, struct.error) as err:
        raise DebiasError(f"{path} is not a readable .npz file ({str(err).splitlines()[0][:200]})") from None
    return found


def open_member(path: str | Path, member: Member, rows: int | None = None) -> np.ndarray:
    """The member's data: a read-only memory map when stored uncompressed, else inflated — only its
    first ``rows`` rows (along axis 0) when given."""
    if member.offset is not None:
        if member.nbytes == 0:
            return np.zeros(member.shape, member.dtype)
        return np.memmap(path, dtype=member.dtype, mode="r", offset=member.offset, shape=member.shape)
    shape = member.shape if rows is None or not member.shape else (min(rows, member.shape[0]), *member.shape[1:])
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{member.name}.npy") as f:
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            out = np.empty(shape, member.dtype)
            view = out.reshape(-1).view(np.uint8)
            done = 0
            while done < view.size:
                got = f.readinto(memoryview(view[done:]))
                if not got:
                    raise EOFError("the array ends early")
                done += got
            return out
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DebiasError(f"{path} is not a readable .npz file ({str(err).splitlines()[0][:200]})") from None


@dataclass(frozen=True)
class Stream:
    """An array to write: its full shape and dtype, and its data as C-ordered blocks along axis 0."""

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Iterable[np.ndarray]


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray | Stream]) -> None:
    """Write arrays (whole, or :class:`Stream` s of blocks) as an uncompressed ``.npz``, atomically and
    deterministically; memory is bounded by the largest block."""

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                stream = array if isinstance(array, Stream) else Stream(array.shape, array.dtype, [array])
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
                info.external_attr = 0o644 << 16
                with archive.open(info, "w", force_zip64=True) as out:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(stream.dtype)),
                              "fortran_order": False, "shape": tuple(stream.shape)}
                    np.lib.format.write_array_header_1_0(out, header)
                    written = 0
                    for block in stream.blocks:
                        block = np.ascontiguousarray(block, dtype=stream.dtype)
                        out.write(block.data)
                        written += block.shape[0] if block.ndim else 1
                    if stream.shape and written != stream.shape[0]:
                        raise ValueError(f"{name}: {written} rows written, {stream.shape[0]} declared")

    atomic_write(path, write)
