"""Resolve what a user names as images: an .npz, an image folder, a features file or a built-in dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from debias.config import DataConfig
from debias.data import DATASETS, load_dataset
from debias.errors import DebiasError
from debias.images import load_images, to_uint8
from debias.metrics.features import Features, load_features

BUILTIN_SHAPES = {"digits": (1, 8), "twemoji": (3, 32)}  # (channels, image size) when nothing else says


def _is_features_file(path: Path) -> bool:
    try:
        with np.load(path) as data:
            return "features" in data.files
    except (OSError, ValueError):
        return False


def image_source(spec: str, like: torch.Tensor | Features | None = None,
                 shape: tuple[int, int] | None = None, max_images: int | None = None) -> torch.Tensor | Features:
    """uint8 images (N, C, H, W) or precomputed :class:`Features` for ``spec``.

    A built-in dataset (``digits``, ``twemoji``) is rendered at ``shape`` = (channels, size), else at
    the shape of ``like`` (the other side of a comparison), else at its natural shape; ``max_images``
    keeps the first N images of a dataset, file or folder.
    """
    path = Path(spec)
    if path.exists():
        if path.suffix == ".npz" and _is_features_file(path):
            return load_features(path)
        return load_images(path)[:max_images]
    if spec in DATASETS and spec != "folder":
        if shape is None and isinstance(like, torch.Tensor):
            shape = (like.shape[1], like.shape[2])
        channels, size = shape or BUILTIN_SHAPES[spec]
        data = DataConfig(name=spec, image_size=size, channels=channels, max_images=max_images)
        return to_uint8(load_dataset(data).images)
    builtins = ", ".join(name for name in DATASETS if name != "folder")
    raise DebiasError(f"{spec}: no such file or folder, and not a built-in dataset ({builtins})")
