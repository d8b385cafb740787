"""What a dataset is in memory: all of it as floats (:class:`ImageDataset`), or block by block as it is decoded
(:class:`ImageBlocks`, which the prepared array of :mod:`debias.data.prepared` is written from)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor


@dataclass
class ImageDataset:
    """Images (N, C, H, W) float32 in [-1, 1], optional labels (N,) int64 in [0, num_classes)."""

    images: Tensor
    labels: Tensor | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of unreadable files

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class ImageBlocks:
    """A dataset decoded block by block (in memory: one block at a time). ``count`` bounds its number of images
    (C, H, W) = ``image_shape`` from above; iterating ``blocks`` yields uint8 arrays (n, C, H, W) and their labels
    (n,) int64 (None when unlabelled), in order; ``skipped`` holds the unreadable files (name, reason) met so far."""

    count: int
    image_shape: tuple[int, int, int]
    blocks: Iterator[tuple[np.ndarray, np.ndarray | None]]
    num_classes: int | None = None
    class_names: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
