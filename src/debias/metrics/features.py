"""Inception features of image sets: extraction (sharded over processes), feature files, statistics.

Images are uint8 tensors (N, C, H, W) with C = 1 (grey, repeated to RGB) or 3. Features are float64
rows of torch-fidelity's ``inception-v3-compat`` layers, extracted once per image set.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from debias.errors import DebiasError
from debias.images import ImageArray, checked_images
from debias.io import atomic_write
from debias.catalog import INCEPTION_BATCH_SIZE
from debias.metrics.extractor import exact_float32
from debias.metrics.inception import LAYER_DIMS, InceptionWeights, extractor
from debias.npz import members
from debias.progress import Report
from debias.runtime import gather_shards, resolve_device, shard_bounds


def extract(
    images: Tensor | ImageArray,
    weights: InceptionWeights,
    layers: tuple[str, ...],
    batch_size: int,
    device: str,
    progress: Report | None,
) -> dict[str, Tensor]:
    """float64 features {layer: (N, D)} of ``images`` uint8 (N, C, H, W) — a tensor, or an
    :class:`~debias.images.ImageArray` read batch by batch; sharded in whole batches over the ranks of
    an initialised torch.distributed group and gathered back in order, so every rank gets the N rows a
    single process computes, bit for bit.

    ``device``: cpu, cuda, cuda:N or auto. ``layers`` are torch-fidelity's (``2048``, ``logits_unbiased``) and ``spatial``: the ADM evaluator's
    sFID features, the first 7 channels of Mixed_6d's 1×1 branch (17×17) flattened in TensorFlow's
    (H, W, C) order, so that statistics compare with those of ADM reference batches.
    """
    if not isinstance(images, ImageArray):
        images = checked_images(images)
    if batch_size < 1:
        raise DebiasError(f"the batch size must be >= 1, got {batch_size}")
    device = str(resolve_device(device))
    n = len(images)
    start, stop = shard_bounds(n, unit=batch_size)  # the batches a single process would run
    network_layers = tuple(layer for layer in layers if layer != "spatial") or ("2048",)
    model = extractor(weights.path, network_layers, device)
    spatial: list[Tensor] = []  # the sFID features of the current batch, caught on their way through the network
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, args, out: spatial.append(out[:, :7].permute(0, 2, 3, 1).flatten(1).to("cpu", torch.float64))
    ) if "spatial" in layers else None
    outputs = {layer: [torch.empty(0, LAYER_DIMS[layer], dtype=torch.float64)] for layer in layers}
    done = 0
    try:
        with torch.inference_mode(), exact_float32(torch.device(device)):
            for first in range(start, stop, batch_size):
                batch = images[first:min(first + batch_size, stop)]  # uint8 (b, C, H, W), grey repeated to RGB
                batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
                for layer, value in zip(network_layers, model(batch.to(device))):
                    if layer in outputs:
                        outputs[layer].append(value.to("cpu", torch.float64))
                if hook is not None:
                    outputs["spatial"].append(spatial.pop())
                done += len(batch)
                if progress is not None:
                    progress(done, stop - start)
    finally:
        if hook is not None:
            hook.remove()
    return {layer: gather_shards(torch.cat(values), n, torch.device(device), unit=batch_size)
            for layer, values in outputs.items()}


def extract_features(
    images: Tensor,
    weights: InceptionWeights,
    batch_size: int = INCEPTION_BATCH_SIZE,
    device: str = "cpu",
    progress: Report | None = None,
) -> Tensor:
    """Inception pool features float64 (N, 2048) of uint8 images (N, C, H, W)."""
    return extract(images, weights, ("2048",), batch_size, device, progress)["2048"]


@dataclass(frozen=True)
class Features:
    """Precomputed pool features float64 (N, 2048), optionally the sFID features (N, 2023), and their
    metadata; ``meta['weights_sha256']`` names the Inception weights, and an optional
    ``meta['image_shape']`` = [C, H, W] the images."""

    values: Tensor
    meta: Mapping[str, Any]
    spatial: Tensor | None = None

    @property
    def weights_sha256(self) -> str:
        return str(self.meta["weights_sha256"])


def save_features(path: str | os.PathLike, feats: Tensor, meta: Mapping[str, Any], spatial: Tensor | None = None) -> None:
    """Write features float64 (N, D), optionally sFID features (N, 2023), and JSON-able ``meta`` (which
    must hold ``weights_sha256``) to ``.npz``."""
    if "weights_sha256" not in meta:
        raise ValueError("feature metadata must record 'weights_sha256'")
    arrays = {"features": feats.to(torch.float64).numpy(), "meta": np.array(json.dumps(dict(meta)))}
    if spatial is not None:
        arrays["spatial"] = spatial.to(torch.float64).numpy()
    atomic_write(_npz_name(path), lambda f: np.savez(f, **arrays))


def _npz_name(path: str | os.PathLike) -> Path:
    """The file ``np.savez(path)`` would write (it appends .npz), written here through :func:`atomic_write`."""
    return Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")


def load_features(path: str | os.PathLike) -> Features:
    """Features written by :func:`save_features` (finite values only; the file's headers are checked
    first, so a forged or inflating member is refused before it is read)."""
    members(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            values = torch.from_numpy(data["features"]).to(torch.float64)
            meta = json.loads(str(data["meta"]))
            spatial = torch.from_numpy(data["spatial"]).to(torch.float64) if "spatial" in data.files else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DebiasError(f"cannot read features file {path}: {e}") from e
    if values.ndim != 2 or not isinstance(meta, dict) or "weights_sha256" not in meta:
        raise DebiasError(f"{path} is not a features file (need 2-D 'features' and meta.weights_sha256)")
    if spatial is not None and (spatial.ndim != 2 or len(spatial) != len(values)):
        raise DebiasError(f"{path}: its spatial features do not match its {len(values)} pool features")
    if not bool(torch.isfinite(values).all()) or (spatial is not None and not bool(torch.isfinite(spatial).all())):
        raise DebiasError(f"{path}: the features hold NaN or infinite values")
    return Features(values, meta, spatial)


@dataclass(frozen=True)
class FeatureStats:
    """FID statistics: mean float64 (D,) and covariance (D, D) of n pool-feature vectors and, optionally,
    of the sFID features (``mu_s``, ``sigma_s``). Also what an ADM reference batch (guided-diffusion's
    evaluator) stores beside or instead of its images: ``mu``/``sigma``/``mu_s``/``sigma_s`` of its
    TensorFlow Inception, which torch-fidelity's ``inception-v3-compat`` reproduces (n and the weights
    unknown: None)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    weights_sha256: str | None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    source: str = ""

    @classmethod
    def from_features(cls, feats: Tensor, weights_sha256: str | None, spatial: Tensor | None = None) -> FeatureStats:
        """Statistics of features (N, D), N >= 2, in float64 (and of sFID features (N, 2023), if given)."""
        if len(feats) < 2:
            raise DebiasError(f"FID needs at least 2 images per set, got {len(feats)}")
        x = feats.to(torch.float64).numpy()
        s = None if spatial is None else spatial.to(torch.float64).numpy()
        return cls(x.mean(axis=0), np.cov(x, rowvar=False), len(x), weights_sha256,
                   None if s is None else s.mean(axis=0), None if s is None else np.cov(s, rowvar=False))

    def save(self, path: str | os.PathLike) -> None:
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.mu_s is not None:
            arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
        if self.n is not None:
            arrays["n"] = self.n
        if self.weights_sha256 is not None:
            arrays["weights_sha256"] = self.weights_sha256
        atomic_write(_npz_name(path), lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Statistics written by :meth:`save`, or an ADM reference batch's ``mu``/``sigma`` (``mu_s``/``sigma_s``)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                if not {"mu", "sigma"} <= set(data.files):
                    raise DebiasError(f"{path} has no FID statistics mu and sigma (found: {', '.join(data.files)})")
                mu, sigma = _stats_pair(data, "mu", "sigma", path)
                mu_s, sigma_s = (_stats_pair(data, "mu_s", "sigma_s", path)
                                 if {"mu_s", "sigma_s"} <= set(data.files) else (None, None))
                n = int(data["n"]) if "n" in data.files else None
                sha = str(data["weights_sha256"]) if "weights_sha256" in data.files else None
        except DebiasError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DebiasError(f"cannot read feature statistics {path} ({str(err).splitlines()[0][:200]})") from None
        return cls(mu, sigma, n, sha, mu_s, sigma_s, source=str(path))


def _stats_pair(data, mu_key: str, sigma_key: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A finite mean (D,) and covariance (D, D) from an npz, or one DebiasError line."""
    mu, sigma = np.asarray(data[mu_key]), np.asarray(data[sigma_key])
    if (mu.ndim != 1 or sigma.shape != mu.shape * 2 or mu.dtype.kind != "f" or sigma.dtype.kind != "f"
            or not (np.isfinite(mu).all() and np.isfinite(sigma).all())):
        raise DebiasError(f"{path}: {mu_key}/{sigma_key} must be finite floats (D,) and (D, D), "
                          f"got {mu.dtype} {mu.shape} and {sigma.dtype} {sigma.shape}")
    return mu.astype(np.float64), sigma.astype(np.float64)


def load_reference(path: str | os.PathLike) -> Features | FeatureStats:
    """What the prepare stage writes as the FID reference: features (with the sFID features), or — for
    a reference given only as statistics — the statistics."""
    try:
        with np.load(path, allow_pickle=False) as data:
            is_features = "features" in data.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DebiasError(f"cannot read the FID reference {path} ({str(err).splitlines()[0][:200]})") from None
    return load_features(path) if is_features else FeatureStats.load(path)
