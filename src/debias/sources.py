"""Resolve what a user names as images: an .npz (images, an ADM batch, features or statistics), an image
folder or a built-in dataset; and the FID reference of the pipeline (:func:`fid_reference`), or the features the
prepare stage stored of it, while they are still what the params would compute (:func:`stored_reference`)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from debias.config import DataConfig, EvalConfig
from debias.data.datasets import DATASETS, load_dataset, source_of
from debias.errors import DebiasError
from debias.images import ImageArray, load_images, open_npz_images, to_uint8
from debias.metrics.features import Features, FeatureStats, load_features

BUILTIN_SHAPES = {"digits": (1, 8), "twemoji": (3, 32)}  # (channels, image size) when nothing else says


def _npz_arrays(path: Path) -> set[str]:
    """The array names of an ``.npz`` file (empty if it cannot be read as one)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return set(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return set()


def image_source(spec: str, like: torch.Tensor | ImageArray | Features | None = None,
                 shape: tuple[int, int] | None = None,
                 max_images: int | None = None) -> torch.Tensor | ImageArray | Features | FeatureStats:
    """uint8 images (N, C, H, W) — a tensor, or for an ``.npz`` an unread :class:`ImageArray` —,
    precomputed :class:`Features`, or FID statistics for ``spec``.

    An ``.npz`` may hold images (``images``, or an ADM batch's ``arr_0``), features (``features``, as
    the prepare stage writes) or only statistics (an ADM reference batch's ``mu``/``sigma``, optionally
    ``mu_s``/``sigma_s``); images win over statistics, so that every metric can be computed with one
    Inception on both sides. A built-in dataset (``digits``, ``twemoji``) is rendered at ``shape`` =
    (channels, size), else at the shape of ``like`` (the other side of a comparison), else at its
    natural shape; ``max_images`` keeps the first N images of a dataset, file or folder.
    """
    path = Path(spec)
    if path.exists():
        arrays = _npz_arrays(path) if path.suffix == ".npz" else set()
        if "features" in arrays:
            return load_features(path)
        if "mu" in arrays and not {"images", "arr_0"} & arrays:
            return FeatureStats.load(path)
        if arrays:
            return open_npz_images(path, rows=max_images).head(max_images)
        return load_images(path)[:max_images]
    if spec in DATASETS and spec != "folder":
        if shape is None and isinstance(like, (torch.Tensor, ImageArray)):
            shape = tuple(like.image_shape[:2]) if isinstance(like, ImageArray) else (like.shape[1], like.shape[2])
        channels, size = shape or BUILTIN_SHAPES[spec]
        data = DataConfig(name=spec, image_size=size, channels=channels, max_images=max_images)
        return to_uint8(load_dataset(data).images)
    builtins = ", ".join(name for name in DATASETS if name != "folder")
    raise DebiasError(f"{spec}: no such file or folder, and not a built-in dataset ({builtins})")


def fid_reference(e: EvalConfig, training_set: Callable[[], torch.Tensor], spec: str | None = None,
                  like: torch.Tensor | ImageArray | None = None,
                  max_images: int | None = None) -> torch.Tensor | ImageArray | Features | FeatureStats:
    """The FID reference the pipeline scores against: ``spec`` if given, else ``eval.reference``, else
    the training set (``training_set()``, uint8) — as images, a fixed random subset of
    ``eval.reference_images`` of them (seed 0, in their order; then the first ``max_images``), or
    precomputed features or statistics."""
    name = spec if spec is not None else e.reference
    reference = image_source(name, like=like) if name is not None else training_set()
    if not isinstance(reference, (torch.Tensor, ImageArray)):
        return reference
    if e.reference_images is not None and e.reference_images < len(reference):
        pick = torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))[:e.reference_images]
        rows = pick.sort().values.tolist()
        reference = reference.take(rows) if isinstance(reference, ImageArray) else reference[rows]
    if max_images is None:
        return reference
    return reference.head(max_images) if isinstance(reference, ImageArray) else reference[:max_images]


def reference_settings(e: EvalConfig, data: DataConfig) -> dict:
    """What decides the images of the pipeline's FID reference: eval.reference, eval.reference_images and the data
    params with, for a folder, the digest of its files (what tells a changed folder); as JSON reads it back. The
    prepare stage records it with the reference features (:func:`stored_reference` compares it)."""
    settings = {"reference": e.reference, "reference_images": e.reference_images, **source_of(data, fingerprint=True)}
    return json.loads(json.dumps(settings))


def stored_reference(path: Path, e: EvalConfig, data: DataConfig, weights_sha256: str,
                     generated: torch.Tensor | ImageArray | Features | FeatureStats
                     ) -> tuple[Features | None, str | None]:
    """The reference features the prepare stage stored at ``path`` if the Inception weights ``weights_sha256``, the
    reference settings of ``e`` and ``data`` (:func:`reference_settings`) and the image shape of ``generated`` are
    the ones they were computed with — else None, to compute them as :func:`fid_reference` does — and a ``note:``
    line that says which (None when ``path`` holds no features: no file, or an ADM batch's statistics)."""
    if "features" not in _npz_arrays(path):
        return None, None
    try:
        stored = load_features(path)
    except DebiasError as err:
        return None, f"note: computing the reference features; {err}"
    shape = (list(generated.image_shape) if isinstance(generated, ImageArray) else
             list(generated.shape[1:]) if isinstance(generated, torch.Tensor) else stored.meta.get("image_shape"))
    same = {"Inception weights": stored.weights_sha256 == weights_sha256,
            "reference settings": stored.meta.get("reference_settings") == reference_settings(e, data),
            "image shape": stored.meta.get("image_shape") == shape}
    differ = [what for what, equal in same.items() if not equal]
    if differ:
        return None, f"note: computing the reference features: {path} was made with other {' and '.join(differ)}"
    return stored, f"note: using the reference features of {path} (the same Inception weights and reference settings)"
