"""Stage `prepare`: the training set as a uint8 array, and the FID reference: Inception pool and sFID
features of a fixed random subset of the training set (or of eval.reference), or the statistics an
ADM reference batch holds instead of images."""

import torch

from debias.config import Config
from debias.data import load_dataset
from debias.errors import DebiasError
from debias.images import to_uint8
from debias.metrics.features import FeatureStats, extract, save_features
from debias.metrics.inception import resolve_inception_weights
from debias.pipeline import PREPARED, REFERENCE_FEATURES, load_prepared, run_stage, save_prepared
from debias.sources import image_source


def main(cfg: Config, args: list[str]) -> None:
    e = cfg.eval
    save_prepared(PREPARED, load_dataset(cfg.data))
    reference = to_uint8(load_prepared(PREPARED).images) if e.reference is None else image_source(e.reference)
    if isinstance(reference, FeatureStats):
        reference.save(REFERENCE_FEATURES)
        return
    if not isinstance(reference, torch.Tensor):
        raise DebiasError(f"eval.reference {e.reference}: give images or an ADM reference batch, not a features file")
    if e.reference_images is not None and e.reference_images < len(reference):
        pick = torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))[:e.reference_images]
        reference = reference[pick.sort().values]
    weights = resolve_inception_weights(e.inception_weights)
    features = extract(reference, weights, ("2048", "spatial"), e.batch_size, e.device, None)
    save_features(REFERENCE_FEATURES, features["2048"], {
        "weights_sha256": weights.sha256, "weights_source": weights.source, "image_shape": list(reference.shape[1:]),
        "dataset": e.reference or cfg.data.name, "count": len(reference)}, spatial=features["spatial"])


if __name__ == "__main__":
    run_stage(main)
