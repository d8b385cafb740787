"""Job `prepare`: the training set as one uint8 array (a prepared set, :mod:`debias.data.prepared`, written
block by block as it is decoded), and the FID reference — Inception pool and sFID
features of a fixed random subset of the training set (or of eval.reference), or the statistics an ADM
reference batch holds instead of images — on every visible GPU. The features record what made them (the
Inception weights, :func:`debias.sources.reference_settings`), so that `debias fid` reuses them while they hold."""

from __future__ import annotations

from pathlib import Path

import torch

from debias.config import Config
from debias.data.datasets import dataset_blocks, source_of
from debias.data.prepared import open_prepared, write_prepared
from debias.errors import DebiasError
from debias.images import ImageArray
from debias.metrics.features import FeatureStats, extract, save_features
from debias.metrics.inception import resolve_inception_weights
from debias.pipeline import PREPARED, REFERENCE_FEATURES
from debias.progress import Progress
from debias.runtime import on_devices
from debias.sources import fid_reference, reference_settings


def prepare(cfg: Config, prepared: Path, reference_features: Path, argv: list[str]) -> None:
    """Write the prepared training set to ``prepared`` and the FID reference to ``reference_features``."""
    e = cfg.eval
    with on_devices(e.device, argv) as (ranks, device):
        if ranks.main:
            write_prepared(prepared, dataset_blocks(cfg.data), source_of(cfg.data))
        if ranks.world > 1:
            torch.distributed.barrier()
        reference = fid_reference(e, lambda: open_prepared(prepared).images)
        if isinstance(reference, FeatureStats):
            if ranks.main:
                reference.save(reference_features)
            return
        if not isinstance(reference, (torch.Tensor, ImageArray)):
            raise DebiasError(f"eval.reference {e.reference}: give images or an ADM reference batch, not features")
        weights = resolve_inception_weights(e.inception_weights)
        with Progress("prepare: reference features", "images", enabled=ranks.main) as progress:
            features = extract(reference, weights, ("2048", "spatial"), e.batch_size, str(device), progress)
        shape = reference.image_shape if isinstance(reference, ImageArray) else reference.shape[1:]
        if ranks.main:
            save_features(reference_features, features["2048"], {
                "weights_sha256": weights.sha256, "weights_source": weights.source, "image_shape": list(shape),
                "dataset": e.reference or cfg.data.name, "count": len(reference),
                "reference_settings": reference_settings(e, cfg.data)}, spatial=features["spatial"])


def prepare_stage(cfg: Config, argv: list[str]) -> None:
    """Stage ``prepare``: data/prepared/ and data/reference_features.npz."""
    prepare(cfg, PREPARED, REFERENCE_FEATURES, argv)
