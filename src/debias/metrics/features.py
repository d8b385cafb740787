"""Inception features of image sets: extraction (sharded over processes), feature files, statistics.

Images are uint8 tensors (N, C, H, W) with C = 1 (grey, repeated to RGB) or 3. Features are float64
rows of torch-fidelity's ``inception-v3-compat`` layers, extracted once per image set.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from debias.errors import DebiasError
from debias.images import checked_images
from debias.io import atomic_write
from debias.metrics.inception import LAYER_DIMS, InceptionWeights, extractor
from debias.runtime import gather_shards, shard_bounds

Progress = Callable[[int, int], None]


class _RGBImages(Dataset):
    """uint8 (N, C, H, W) images served as uint8 (3, H, W) tensors, grey repeated to RGB."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        image = self.images[i]
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def extract(
    images: Tensor,
    weights: InceptionWeights,
    layers: tuple[str, ...],
    batch_size: int,
    device: str,
    progress: Progress | None,
) -> dict[str, Tensor]:
    """float64 features {layer: (N, D)} of ``images`` uint8 (N, C, H, W); sharded over the ranks of an
    initialised torch.distributed group and gathered back in order, so every rank gets all N rows."""
    images = checked_images(images)
    n = len(images)
    start, stop = shard_bounds(n)
    model = extractor(weights.path, layers, device)
    loader = DataLoader(_RGBImages(images[start:stop]), batch_size=batch_size, num_workers=0)
    outputs = {layer: [torch.empty(0, LAYER_DIMS[layer], dtype=torch.float64)] for layer in layers}
    done = 0
    with torch.no_grad():
        for batch in loader:
            for layer, value in zip(layers, model(batch.to(device))):
                outputs[layer].append(value.to("cpu", torch.float64))
            done += len(batch)
            if progress is not None:
                progress(done, stop - start)
    return {layer: gather_shards(torch.cat(values), n, torch.device(device)) for layer, values in outputs.items()}


def extract_features(
    images: Tensor,
    weights: InceptionWeights,
    batch_size: int = 64,
    device: str = "cpu",
    progress: Progress | None = None,
) -> Tensor:
    """Inception pool features float64 (N, 2048) of uint8 images (N, C, H, W)."""
    return extract(images, weights, ("2048",), batch_size, device, progress)["2048"]


@dataclass(frozen=True)
class Features:
    """Precomputed pool features float64 (N, 2048) with their metadata; ``meta['weights_sha256']``
    names the Inception weights, and an optional ``meta['image_shape']`` = [C, H, W] the images."""

    values: Tensor
    meta: Mapping[str, Any]

    @property
    def weights_sha256(self) -> str:
        return str(self.meta["weights_sha256"])


def save_features(path: str | os.PathLike, feats: Tensor, meta: Mapping[str, Any]) -> None:
    """Write features float64 (N, D) and JSON-able ``meta`` (must hold ``weights_sha256``) to ``.npz``."""
    if "weights_sha256" not in meta:
        raise ValueError("feature metadata must record 'weights_sha256'")
    features, meta_json = feats.to(torch.float64).numpy(), np.array(json.dumps(dict(meta)))
    atomic_write(_npz_name(path), lambda f: np.savez(f, features=features, meta=meta_json))


def _npz_name(path: str | os.PathLike) -> Path:
    """The file ``np.savez(path)`` would write (it appends .npz), written here through :func:`atomic_write`."""
    return Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")


def load_features(path: str | os.PathLike) -> Features:
    """Features written by :func:`save_features`."""
    try:
        with np.load(path) as data:
            values = torch.from_numpy(data["features"]).to(torch.float64)
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DebiasError(f"cannot read features file {path}: {e}") from e
    if values.ndim != 2 or not isinstance(meta, dict) or "weights_sha256" not in meta:
        raise DebiasError(f"{path} is not a features file (need 2-D 'features' and meta.weights_sha256)")
    return Features(values, meta)


@dataclass(frozen=True)
class FeatureStats:
    """Mean float64 (D,) and covariance float64 (D, D) of n feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    weights_sha256: str

    @classmethod
    def from_features(cls, feats: Tensor, weights_sha256: str) -> FeatureStats:
        """Statistics of features (N, D), N >= 2, in float64."""
        if len(feats) < 2:
            raise DebiasError(f"FID needs at least 2 images per set, got {len(feats)}")
        x = feats.to(torch.float64).numpy()
        return cls(x.mean(axis=0), np.cov(x, rowvar=False), len(x), weights_sha256)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(_npz_name(path), lambda f: np.savez(f, mu=self.mu, sigma=self.sigma, n=self.n,
                                                       weights_sha256=self.weights_sha256))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        try:
            with np.load(path) as data:
                return cls(data["mu"], data["sigma"], int(data["n"]), str(data["weights_sha256"]))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise DebiasError(f"cannot read feature statistics {path}: {e}") from e
