"""Stage `prepare`: the training set as a uint8 array, and its Inception features (FID reference)."""

import torch

from debias.config import Config
from debias.data import load_dataset
from debias.images import to_uint8
from debias.metrics.features import extract_features, save_features
from debias.metrics.inception import resolve_inception_weights
from debias.pipeline import PREPARED, REFERENCE_FEATURES, load_prepared, run_stage, save_prepared


def main(cfg: Config, args: list[str]) -> None:
    save_prepared(PREPARED, load_dataset(cfg.data))
    images = to_uint8(load_prepared(PREPARED).images)
    if cfg.eval.reference_images is not None and cfg.eval.reference_images < len(images):
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:cfg.eval.reference_images]
        images = images[pick.sort().values]
    weights = resolve_inception_weights(cfg.eval.inception_weights)
    features = extract_features(images, weights, batch_size=cfg.eval.batch_size, device=cfg.eval.device)
    save_features(REFERENCE_FEATURES, features, {
        "weights_sha256": weights.sha256, "weights_source": weights.source,
        "image_shape": list(images.shape[1:]), "dataset": cfg.data.name, "count": len(images)})


if __name__ == "__main__":
    run_stage(main)
