"""Images in and out: uint8 ↔ float, one safe decoder, and the npz / PNG / folder readers and writers.

Image sets are uint8 tensors (N, C, H, W) with C = 1 (grey) or 3 (RGB); networks see floats in
[-1, 1] (x / 127.5 − 1, as guided-diffusion). Every file is decoded by :func:`decode_image`, which
refuses what could hang or exhaust the machine (FIFOs and devices, empty files, decompression bombs)
with a reason, and every write is atomic (:func:`debias.io.atomic_write`).
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from debias.errors import DebiasError
from debias.io import atomic_write
from debias.npz import Stream, members, open_member, write_npz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OUTPUT_SUFFIXES = (".png", ".npz")  # image files written here: a PNG grid, or an array file

ImageSource = Union[str, os.PathLike, np.ndarray, Tensor]


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] (any shape) → uint8 in [0, 255], rounded and clamped."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: np.ndarray | Tensor) -> Tensor:
    """uint8 (N, C, H, W) → float32 in [-1, 1] (x / 127.5 − 1, as guided-diffusion); a new, contiguous tensor (a
    decoder's (N, H, W, C) array transposed would otherwise stay channels-last in memory, and the network would
    round differently on it than on the same images read from the prepared array)."""
    return torch.as_tensor(images).contiguous().float().div_(127.5).sub_(1.0)


def checked_images(images: Tensor | np.ndarray, what: str = "images") -> Tensor:
    """``images`` as a uint8 tensor (N, C, H, W) with C ∈ {1, 3} and N ≥ 1; DebiasError naming ``what``."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise DebiasError(f"{what}: images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DebiasError(f"{what}: images must be N x C x H x W with C = 1 or 3, got shape {tuple(images.shape)}")
    if len(images) == 0:
        raise DebiasError(f"{what}: no images")
    if min(images.shape[2:]) < 1:
        raise DebiasError(f"{what}: the images are {images.shape[2]}x{images.shape[3]} pixels")
    return images


# --------------------------------------------------------------------------- decoding one file

Decoded = TypeVar("Decoded")  # what decode_image makes of an image


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason."""


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer greyscale ("I;16*", "I") and float ("F") images → "L" (16-bit range scaled down)."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = np.clip(arr, 0.0, 255.0)
    else:
        arr = np.clip(arr.astype(np.float64) / 257.0, 0.0, 255.0)
    return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)


def to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image to "L" or "RGB"; transparency is composited on white."""
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im)
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1, P, ...
    return im if im.mode == mode else im.convert(mode)


def decode_image(path: Path, convert: Callable[[Image.Image], Decoded]) -> Decoded:
    """``convert(image)`` of the decoded file at ``path``. Raises :class:`BadImage` with the reason for
    any unusable file: not a regular file (a FIFO or device named *.png would block forever), empty,
    over PIL's pixel limit (a possible decompression bomb), or undecodable."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise BadImage(f"cannot stat ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadImage("not a regular file")
    if info.st_size == 0:
        raise BadImage("empty file")
    try:
        with Image.open(path) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:
                raise BadImage(f"too large ({im.width}x{im.height} pixels; possible decompression bomb)")
            im.load()
            return convert(im)
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage("too large (possible decompression bomb)") from None
    except Exception as err:  # noqa: BLE001 — decoders of untrusted files raise many types
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise BadImage(reason) from None


def _as_stored(im: Image.Image) -> np.ndarray:
    """An 8-bit grey or RGB image as uint8 (C, H, W), unchanged; other modes are refused."""
    if im.mode not in ("L", "RGB"):
        raise BadImage(f"image mode {im.mode}; use 8-bit greyscale (L) or RGB")
    arr = np.asarray(im)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# --------------------------------------------------------------------------- reading sets

def _describe(arr: np.ndarray) -> str:
    channels, height, width = arr.shape
    return f"{'grey' if channels == 1 else 'RGB'} {width}x{height}"


def read_folder(folder: Path) -> Tensor:
    """The images of one folder (not recursive, sorted by name, all of one size and mode) as uint8
    (N, C, H, W), exactly as stored (no resizing)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DebiasError(f"{folder} holds no image files ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})")
    arrays = []
    for path in files:
        try:
            arrays.append(decode_image(path, _as_stored))
        except BadImage as reason:
            raise DebiasError(f"cannot read image {path}: {reason}") from None
        if arrays[-1].shape != arrays[0].shape:
            raise DebiasError(f"{path} is {_describe(arrays[-1])} but {files[0].name} is {_describe(arrays[0])}; "
                              "all images in a folder must share size and mode")
    return torch.from_numpy(np.stack(arrays))


class ImageArray:
    """uint8 images on disk, read lazily: ``len``, ``image_shape`` (C, H, W), and ``[index]`` → uint8 (n, C, H, W)
    tensors (copies of just those images, read from a memory map): an ``.npz`` member, a prepared set, or the
    ``rows`` of one (:meth:`take`)."""

    def __init__(self, array: np.ndarray, channels_last: bool, source: str, rows: np.ndarray | None = None):
        self.array, self.channels_last, self.source, self.rows = array, channels_last, source, rows

    def __len__(self) -> int:
        return len(self.array) if self.rows is None else len(self.rows)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        n, *shape = self.array.shape
        return (shape[2], shape[0], shape[1]) if self.channels_last else tuple(shape)

    def head(self, n: int | None) -> ImageArray:
        """The first ``n`` images (all for None), still unread."""
        if self.rows is not None:
            return ImageArray(self.array, self.channels_last, self.source, self.rows[:n])
        return ImageArray(self.array[:n], self.channels_last, self.source)

    def take(self, rows: Sequence[int]) -> ImageArray:
        """The images at ``rows`` (in that order), still unread."""
        rows = np.asarray(rows, dtype=np.int64)
        return ImageArray(self.array, self.channels_last, self.source, rows if self.rows is None else self.rows[rows])

    def __getitem__(self, index: slice | Sequence[int]) -> Tensor:
        images = np.array(self.array[index if self.rows is None else self.rows[index]])
        return torch.from_numpy(images.transpose(0, 3, 1, 2).copy() if self.channels_last else images)

    def blocks(self, size: int = 1024) -> Iterator[Tensor]:
        """All the images, ``size`` at a time (uint8 (n, C, H, W) tensors)."""
        for start in range(0, len(self), size):
            yield self[start:start + size]


def open_npz_images(path: str | Path, rows: int | None = None) -> ImageArray:
    """The images of an ``.npz`` file, checked from its header (nothing unpickled, no data read): its
    ``images`` (N, C, H, W), or the ``arr_0`` (N, H, W, C) of guided-diffusion's sample and reference batches.
    ``rows``: only the first that many are needed (a compressed file is inflated only so far)."""
    arrays = members(path)
    if "images" in arrays:
        member, channels_last = arrays["images"], False
    elif "arr_0" in arrays:
        member, channels_last = arrays["arr_0"], True
        if len(member.shape) != 4 or member.shape[-1] not in (1, 3):
            raise DebiasError(f"{path}: arr_0 must be an ADM batch N x H x W x C with C = 1 or 3, "
                              f"got shape {member.shape}")
    else:
        raise DebiasError(f"{path} has no 'images' or 'arr_0' array (found: {', '.join(arrays) or 'nothing'})")
    if member.dtype != np.uint8:
        raise DebiasError(f"{path}: images must be uint8, got {member.dtype}")
    shape = member.shape if not channels_last else (*member.shape[:1], *member.shape[3:], *member.shape[1:3])
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise DebiasError(f"{path}: images must be N x C x H x W with C = 1 or 3, got shape {member.shape}")
    if shape[0] == 0:
        raise DebiasError(f"{path}: no images")
    if min(shape[2:]) < 1:
        raise DebiasError(f"{path}: the images are {shape[2]}x{shape[3]} pixels")
    return ImageArray(open_member(path, member, rows), channels_last, str(path))


def read_npz(path: str | Path) -> Tensor:
    """All the images of an ``.npz`` (see :func:`open_npz_images`) as one uint8 tensor (N, C, H, W)."""
    images = open_npz_images(path)
    return images[:]


def load_images(source: ImageSource) -> Tensor:
    """uint8 images (N, C, H, W), C ∈ {1, 3}, from an ``.npz`` (:func:`open_npz_images`), a folder of
    image files (:func:`read_folder`) or an in-memory array/tensor."""
    if isinstance(source, (np.ndarray, Tensor)):
        return checked_images(source, "image array")
    path = Path(source)
    if path.is_dir():
        return checked_images(read_folder(path), str(path))
    if not path.is_file():
        raise DebiasError(f"no such image file or folder: {path}")
    if path.suffix != ".npz":
        raise DebiasError(f"{path}: expected a .npz file with key 'images' or a folder of images")
    return read_npz(path)


# --------------------------------------------------------------------------- writing

def _save_png(array_hwc: np.ndarray, path: Path) -> None:
    """Write an (H, W, C) uint8 array as a PNG, atomically (grey for C = 1)."""
    image = Image.fromarray(array_hwc[..., 0] if array_hwc.shape[-1] == 1 else array_hwc)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_png_grid(images: Tensor | np.ndarray, path: str | Path, nrow: int | None = None, padding: int = 2,
                  scale: int = 1) -> None:
    """Tile uint8 (N, C, H, W) images into one PNG, ``nrow`` per row (default ⌈√N⌉), black ``padding``,
    each image enlarged ``scale`` times (nearest neighbour) so that tiny images can be seen."""
    arr = checked_images(images).numpy()
    if scale > 1:
        arr = arr.repeat(scale, axis=2).repeat(scale, axis=3)
    n, c, h, w = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / nrow))
    grid = np.zeros((padding + rows * (h + padding), padding + nrow * (w + padding), c), dtype=np.uint8)
    for k in range(n):
        top, left = padding + (k // nrow) * (h + padding), padding + (k % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = arr[k].transpose(1, 2, 0)
    _save_png(grid, Path(path))


def save_png_folder(images: Tensor | np.ndarray, directory: str | Path, indices: Sequence[int] | None = None) -> None:
    """One PNG per image, ``{index:06d}.png`` in ``directory`` (index defaults to 0..N-1), each atomic."""
    arr = checked_images(images).numpy()
    indices = range(len(arr)) if indices is None else indices
    for index, image in zip(indices, arr):
        _save_png(image.transpose(1, 2, 0), Path(directory) / f"{int(index):06d}.png")


NPZ_LAYOUTS = ("npz", "adm", "float32")


def write_images_npz(path: str | Path, blocks: Iterable[np.ndarray], shape: Sequence[int], layout: str = "npz") -> None:
    """The one writer of image ``.npz`` files: images of ``shape`` (N, C, H, W), given as C-ordered blocks along
    N (one block in memory at a time), in ``layout`` — ``npz``: uint8 ``images`` (N, C, H, W), debias's;
    ``adm``: uint8 ``arr_0`` (N, H, W, C), guided-diffusion's sample batches; ``float32``: unrounded float32
    ``images`` (N, C, H, W). Atomic and deterministic."""
    n, c, h, w = shape
    if layout == "adm":
        write_npz(path, {"arr_0": Stream((n, h, w, c), np.dtype(np.uint8), (b.transpose(0, 2, 3, 1) for b in blocks))})
    elif layout in ("npz", "float32"):
        dtype = np.dtype(np.float32 if layout == "float32" else np.uint8)
        write_npz(path, {"images": Stream((n, c, h, w), dtype, blocks)})
    else:
        raise ValueError(f"unknown npz layout {layout!r}")


def save_npz(images: Tensor | np.ndarray, path: str | Path) -> None:
    """Save uint8 (N, C, H, W) images as ``images`` in an .npz file, atomically."""
    arr = checked_images(images).numpy()
    write_images_npz(path, [arr], arr.shape)


def save_adm_npz(images: Tensor | np.ndarray, path: str | Path) -> None:
    """Save uint8 (N, C, H, W) images as guided-diffusion's sample batches do: ``arr_0`` uint8 (N, H, W, C)."""
    arr = checked_images(images).numpy()
    write_images_npz(path, [arr], arr.shape, "adm")


def read_noise(path: str | Path) -> Tensor:
    """The float32 array (N, C, H, W) of an ``.npz`` file: its only array, or the one named ``noise``."""
    arrays = members(path)
    if len(arrays) != 1 and "noise" not in arrays:
        raise DebiasError(f"{path} must hold one array or one named 'noise' (found: {', '.join(arrays) or 'nothing'})")
    member = arrays["noise"] if "noise" in arrays else next(iter(arrays.values()))
    if member.dtype.kind != "f" or len(member.shape) != 4:
        raise DebiasError(f"{path}: the noise must be a float array N x C x H x W, got {member.dtype} {member.shape}")
    return torch.from_numpy(np.array(open_member(path, member), dtype=np.float32))


def check_output(path: str | Path) -> Path:
    """``path`` if it names an image file this library writes (a ``.png`` grid or an ``.npz``); DebiasError otherwise."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise DebiasError(f"{path}: unknown output kind {suffix or '(no suffix)'!r}; use .png (a grid) or .npz")
    return path
