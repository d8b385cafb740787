"""The prepared training set: one uint8 array on disk, read as a memory map — memory per process does not
grow with the dataset, and every process of a node shares one copy of its pixels through the page cache.

A prepared set is a folder:

- ``images.npy``: uint8 (N, C, H, W), a plain NumPy ``.npy`` file (``np.load(path, mmap_mode="r")`` reads it),
  written block by block as the images are decoded, so writing it needs memory for one block at any N;
- ``labels.npy``: int64 (N,) class labels in [0, num_classes) (absent for an unlabelled set);
- ``meta.json``: the count, image shape, classes, the unreadable files that were skipped, and the ``source``
  (the data settings and what was read) that made it — what a rerun compares to reuse it.

Opening one checks the headers against the file sizes and every value that sizes an allocation, so a
truncated or forged set is one :class:`~debias.errors.DebiasError` line before anything large is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from debias.data.sets import ImageBlocks
from debias.errors import DebiasError
from debias.images import ImageArray
from debias.io import atomic_folder, atomic_write

IMAGES, LABELS, META = "images.npy", "labels.npy", "meta.json"
HEADER_BYTES = 128  # the .npy header of images.npy: fixed, so that it is written once the count is known
MAX_CLASSES = 1_000_000
MAX_META_BYTES = 1 << 20


@dataclass
class PreparedSet:
    """A prepared set opened read-only: ``images`` uint8 (N, C, H, W), an :class:`~debias.images.ImageArray` over
    the memory map (``[rows]`` reads just those images); ``labels`` (N,) int64 or None; ``meta`` (meta.json)."""

    folder: Path
    images: ImageArray
    labels: Tensor | None
    num_classes: int | None
    meta: dict[str, Any]
    offset: int  # where the pixels start in images.npy

    def __post_init__(self) -> None:
        self._file = open(self.folder / IMAGES, "rb", buffering=0)  # for read_rows: one descriptor, pread is thread-safe

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.images.image_shape

    def pixels(self) -> Tensor:
        """The whole uint8 array as a tensor over the memory map (no copy: pages are read as they are touched)."""
        return torch.from_numpy(self.images.array)

    def read_rows(self, rows: Tensor) -> Tensor:
        """uint8 (n, C, H, W) of the images at ``rows`` (n,), read with ``pread``: through the page cache, which
        every process of the machine shares, but never mapped into this one — its memory is the n rows, whatever
        the set's size and however many rows it has read before (a memory map would keep each page it touched,
        and the kernel's read-ahead around it, in the process's resident set)."""
        out = torch.empty((len(rows), *self.image_shape), dtype=torch.uint8)
        flat = out.numpy().reshape(len(rows), -1)
        size = flat.shape[1]
        for i, row in enumerate(rows.tolist()):
            view, done = memoryview(flat[i]), 0
            while done < size:  # a regular file returns every byte at once; loop for the rule's sake
                got = os.preadv(self._file.fileno(), [view[done:]], self.offset + row * size + done)
                if not got:
                    raise DebiasError(f"{self.folder / IMAGES} ends before image {row}; it was truncated while in use")
                done += got
        return out


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A version-1.0 ``.npy`` header of exactly :data:`HEADER_BYTES` bytes for a C-ordered uint8 array."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    length = HEADER_BYTES - 10  # magic (6), version (2), header length (2)
    if len(text) + 1 > length:
        raise DebiasError(f"cannot write a prepared set of shape {tuple(shape)}")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", length) + (text.ljust(length - 1) + "\n").encode("latin1")


def write_prepared(folder: str | Path, blocks: ImageBlocks, source: dict[str, Any]) -> PreparedSet:
    """Write the images of ``blocks`` (and their labels) as a prepared set in ``folder``, block by block, whole or
    not at all (:func:`~debias.io.atomic_folder`); ``source`` is recorded in meta.json."""
    def write(tmp: Path) -> None:
        count, label_blocks = 0, []
        row = math.prod(blocks.image_shape)
        with open(tmp / IMAGES, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)
            for images, labels in blocks.blocks:
                f.write(np.ascontiguousarray(images, dtype=np.uint8).data)
                count += len(images)
                if labels is not None:
                    label_blocks.append(labels.astype(np.int64))
            f.seek(0)
            f.write(_npy_header((count, *blocks.image_shape)))
            f.seek(HEADER_BYTES + count * row)
            f.truncate()
        if blocks.num_classes is not None:
            np.save(tmp / LABELS, np.concatenate(label_blocks) if label_blocks else np.zeros(0, np.int64))
        meta = {"count": count, "image_shape": list(blocks.image_shape), "num_classes": blocks.num_classes,
                "class_names": blocks.class_names, "skipped": [list(item) for item in blocks.skipped],
                "source": source}
        atomic_write(tmp / META, lambda f: f.write(json.dumps(meta, indent=1) + "\n"), mode="w")

    atomic_folder(folder, write)
    return open_prepared(folder)


def _array_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a ``.npy`` file, read from its header only; DebiasError if it is none."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f, max_header_size=10_000)
            offset = f.tell()
    except FileNotFoundError:
        raise DebiasError(f"{path} not found; run `dvc repro prepare` first") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DebiasError(f"{path} is not a readable .npy array ({str(err).splitlines()[0][:200]})") from None
    if fortran:
        raise DebiasError(f"{path}: a Fortran-ordered array; prepared sets are C-ordered")
    return tuple(shape), dtype, offset


def _check_size(path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
    expected = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise DebiasError(f"{path}: the header says {shape} {dtype} ({expected} bytes with it), the file has "
                          f"{actual} bytes; it is truncated or not a prepared set — run `dvc repro prepare`")


def open_prepared(folder: str | Path) -> PreparedSet:
    """A prepared set read-only, its pixels as a memory map; a missing, truncated or forged file is one DebiasError
    line naming it, raised before any large allocation."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DebiasError(f"{folder} not found (a prepared set is a folder); run `dvc repro prepare` first")
    meta_path = folder / META
    try:
        if meta_path.stat().st_size > MAX_META_BYTES:
            raise DebiasError(f"{meta_path} is larger than {MAX_META_BYTES} bytes; not a prepared set")
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DebiasError(f"{meta_path} not found; run `dvc repro prepare` first") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DebiasError(f"{meta_path} is not readable JSON ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(meta, dict):
        raise DebiasError(f"{meta_path} is not a prepared set's metadata")
    path = folder / IMAGES
    shape, dtype, offset = _array_header(path)
    if dtype != np.uint8 or len(shape) != 4 or shape[1] not in (1, 3) or min(shape) < 1:
        raise DebiasError(f"{path}: a prepared set is uint8 N x C x H x W with C = 1 or 3 and N >= 1, "
                          f"got {dtype} {shape}")
    _check_size(path, shape, dtype, offset)
    if meta.get("count") != shape[0] or meta.get("image_shape") != list(shape[1:]):
        raise DebiasError(f"{meta_path} describes {meta.get('count')} images of {meta.get('image_shape')}, "
                          f"{path} holds {shape[0]} of {list(shape[1:])}")
    images = ImageArray(np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=shape), False, str(path))
    num_classes = meta.get("num_classes")
    labels = None
    if num_classes is not None:
        if type(num_classes) is not int or not 1 <= num_classes <= MAX_CLASSES:
            raise DebiasError(f"{meta_path}: num_classes={num_classes!r} is not an integer in [1, {MAX_CLASSES}]")
        labels_path = folder / LABELS
        label_shape, label_dtype, label_offset = _array_header(labels_path)
        if label_dtype != np.int64 or label_shape != (shape[0],):
            raise DebiasError(f"{labels_path}: labels must be int64 ({shape[0]},), got {label_dtype} {label_shape}")
        _check_size(labels_path, label_shape, label_dtype, label_offset)
        labels = torch.from_numpy(np.fromfile(labels_path, dtype=np.int64, offset=label_offset))
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise DebiasError(f"{labels_path}: labels outside [0, {num_classes})")
    return PreparedSet(folder, images, labels, num_classes, meta, offset)
