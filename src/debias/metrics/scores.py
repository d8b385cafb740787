"""FID, sFID, KID, precision/recall (and Inception Score) through torch-fidelity, fully offline.

Every metric works on Inception features of the FID Inception (:mod:`debias.metrics.inception`),
extracted once per image set (:mod:`debias.metrics.features`): the 2048-d pool features for FID, KID
and precision/recall, the ADM evaluator's spatial features for sFID (Nash et al. 2021: the Fréchet
distance of the first 7 channels of ``mixed_6/conv``), the logits for the Inception Score. Statistics
are float64. A reference may be images, a features file, or FID statistics (an ADM reference batch's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from debias.catalog import INCEPTION_BATCH_SIZE, METRICS
from debias.errors import DebiasError
from debias.images import ImageArray, ImageSource, load_images
from debias.metrics.features import Features, FeatureStats, extract
from debias.metrics.frechet import frechet_distance
from debias.metrics.intervals import FrechetToReference, score_intervals
from debias.metrics.inception import EXTRACTOR, FEATURE_DIM, SPATIAL_DIM, InceptionWeights, resolve_inception_weights
from debias.progress import Report

Source = Union[Tensor, ImageArray, Features, FeatureStats]
# the numbers a run is judged by (DVC metrics); the rest (kid_std, seconds, provenance) are details
HEADLINE = ("fid", "sfid", "kid", "precision", "recall", "isc")


def _count(source: Source) -> int | None:
    """The number of images behind a source (None for statistics)."""
    if isinstance(source, FeatureStats):
        return None
    return len(source.values) if isinstance(source, Features) else len(source)


def _check_request(metrics: Sequence[str], gen: Source, ref: Source, weights: InceptionWeights, kid_subset_size: int,
                   pr_k: int) -> None:
    """One-line errors for a request the sources cannot serve."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise DebiasError(f"unknown metric {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if isinstance(gen, FeatureStats):
        raise DebiasError("the generated side must be images or a features file, not FID statistics")
    if isinstance(ref, FeatureStats):
        needs_features = [m for m in metrics if m in ("kid", "pr")]
        if needs_features:
            raise DebiasError(f"{', '.join(needs_features)} need reference images or features; {ref.source} holds "
                              "only FID statistics (use -m fid / -m sfid)")
        if "sfid" in metrics and ref.mu_s is None:
            raise DebiasError(f"sFID needs spatial statistics mu_s/sigma_s, which {ref.source} lacks")
    for name, source in (("generated", gen), ("reference", ref)):
        if "sfid" in metrics and isinstance(source, Features) and source.spatial is None:
            raise DebiasError(f"sFID needs spatial features, which the {name} features file lacks; recompute it "
                              "(dvc repro prepare) or drop sfid")
    if "isc" in metrics and not weights.has_logits:
        raise DebiasError(
            f"Inception Score needs Inception weights with the fc layer; the {weights.source} weights lack it"
        )
    if "isc" in metrics and isinstance(gen, Features):
        raise DebiasError("Inception Score needs the generated images, not precomputed features")
    n_gen, n_ref = _count(gen), _count(ref)
    smaller = min(n_gen, n_ref if n_ref is not None else n_gen)
    if {"fid", "sfid"} & set(metrics) and smaller < 2:
        raise DebiasError(f"FID needs at least 2 images per set, got {n_gen} generated and {n_ref} reference")
    if "kid" in metrics and kid_subset_size > smaller:
        raise DebiasError(
            f"KID subset size {kid_subset_size} is larger than the image sets "
            f"({n_gen} generated, {n_ref} reference); lower the KID subset size"
        )
    if "pr" in metrics and pr_k >= smaller:
        raise DebiasError(
            f"precision/recall k = {pr_k} needs more than {pr_k} images per set "
            f"({n_gen} generated, {n_ref} reference); lower k"
        )


def _image_shape(source: Source) -> tuple[int, ...] | None:
    if isinstance(source, FeatureStats):
        return None
    if isinstance(source, Features):
        shape = source.meta.get("image_shape")
        return tuple(shape) if shape is not None else None
    return tuple(source.image_shape) if isinstance(source, ImageArray) else tuple(source.shape[1:])


def _width(source: Source) -> int:
    """The width of a source's pool features (images: the Inception's)."""
    if isinstance(source, Features):
        return source.values.shape[1]
    return len(source.mu) if isinstance(source, FeatureStats) else FEATURE_DIM


def _check_compatible(generated: Source, reference: Source, sha256: str) -> None:
    for name, source in (("generated", generated), ("reference", reference)):
        width = _width(source)
        if width != FEATURE_DIM:
            raise DebiasError(f"{name} features are {width}-d, not the {FEATURE_DIM}-d Inception "
                              "pool features these metrics use")
        if isinstance(source, FeatureStats) and source.mu_s is not None and len(source.mu_s) != SPATIAL_DIM:
            raise DebiasError(f"{name} spatial statistics are {len(source.mu_s)}-d, not the {SPATIAL_DIM}-d "
                              "sFID features")
        if isinstance(source, (Features, FeatureStats)) and source.weights_sha256 not in (sha256, None):
            raise DebiasError(
                f"{name} features were computed with Inception weights {source.weights_sha256[:12]}, "
                f"these metrics use {sha256[:12]}; recompute them with the same weights"
            )
    gen_shape, ref_shape = _image_shape(generated), _image_shape(reference)
    if gen_shape is not None and ref_shape is not None and gen_shape != ref_shape:
        raise DebiasError(
            f"generated images are C x H x W = {'x'.join(map(str, gen_shape))} but reference images are "
            f"{'x'.join(map(str, ref_shape))}; they must match"
        )


def compute_metrics(
    generated: ImageSource | ImageArray | Features,
    reference: ImageSource | ImageArray | Features | FeatureStats,
    weights: str | os.PathLike | InceptionWeights | None = None,
    metrics: Sequence[str] = ("fid", "kid", "pr"),
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    pr_k: int = 3,
    batch_size: int = INCEPTION_BATCH_SIZE,
    device: str = "cpu",
    seed: int = 0,
    bootstrap: int = 0,
    interval_level: float = 0.95,
    fid_infinity: bool = False,
    progress: Report | None = None,
) -> dict[str, Any]:
    """Score generated images against reference images (either side may be precomputed
    :class:`Features`, the reference also FID statistics); features are extracted once per set and
    shared by all metrics.

    Returns the requested values — ``fid``; ``sfid``; ``kid``, ``kid_std`` (unbiased MMD² with the cubic
    polynomial kernel over ``kid_subsets`` random subsets); ``precision``, ``recall`` (k-NN manifolds
    of Kynkäänniemi et al. 2019); ``isc``, ``isc_std`` (needs weights with a real fc layer) — and
    ``provenance``: image counts, extractor, weights sha256/source, torch-fidelity version, seconds.
    ``progress(done, total)`` counts images over both sets.
    """
    import torch_fidelity

    started = time.perf_counter()
    if not isinstance(weights, InceptionWeights):
        weights = resolve_inception_weights(weights)
    gen = generated if isinstance(generated, (Features, ImageArray)) else load_images(generated)
    ref = reference if isinstance(reference, (Features, FeatureStats, ImageArray)) else load_images(reference)
    _check_request(metrics, gen, ref, weights, kid_subset_size, pr_k)
    if fid_infinity and ("fid" not in metrics or _count(gen) < 3):
        raise DebiasError(f"FID∞ needs the fid metric and at least 3 generated images (got {_count(gen)}), to fit FID "
                          "at 2 or more sample counts")
    _check_compatible(gen, ref, weights.sha256)

    total, offset = sum(len(s) for s in (gen, ref) if isinstance(s, (Tensor, ImageArray))), 0

    def features_of(source: Tensor | ImageArray | Features, layers: tuple[str, ...]) -> dict[str, Tensor]:
        nonlocal offset
        if isinstance(source, Features):
            return {"2048": source.values, "spatial": source.spatial}
        base, offset = offset, offset + len(source)
        report = None if progress is None else (lambda done, _: progress(base + done, total))
        return extract(source, weights, layers, batch_size, device, report)

    layers = ("2048", "spatial") if "sfid" in metrics else ("2048",)
    gen_feats = features_of(gen, layers + (("logits_unbiased",) if "isc" in metrics else ()))
    ref_feats = None if isinstance(ref, FeatureStats) else features_of(ref, layers)
    ref_side = ref_feats if ref_feats is not None else ref
    result = _scores(gen_feats, ref_side, metrics, kid_subset_size, kid_subsets, pr_k, seed)
    if bootstrap or fid_infinity:
        result["intervals"] = _intervals(gen_feats, ref_side, result, metrics, bootstrap, interval_level, fid_infinity,
                                         kid_subset_size, kid_subsets, _count(gen), _count(ref), seed)
    result["provenance"] = {
        "n_generated": _count(gen),
        "n_reference": _count(ref),
        "reference_statistics": ref.source if isinstance(ref, FeatureStats) else None,
        "extractor": EXTRACTOR,
        "weights_sha256": weights.sha256,
        "weights_source": weights.source,
        "torch_fidelity_version": torch_fidelity.__version__,
        "kid_subset_size": kid_subset_size,
        "kid_subsets": kid_subsets,
        "pr_k": pr_k,
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    return result


def _statistics(feats: dict[str, Tensor] | FeatureStats, spatial: bool) -> FeatureStats:
    """FID statistics of features {layer: (N, D)} (with the sFID ones when ``spatial``); statistics as they are."""
    if isinstance(feats, FeatureStats):
        return feats
    return FeatureStats.from_features(feats["2048"], None, feats["spatial"] if spatial else None)


def _intervals(gen: dict[str, Tensor], ref: dict[str, Tensor] | FeatureStats, scores: dict[str, Any],
               metrics: Sequence[str], replicates: int, level: float, infinity: bool, kid_subset_size: int,
               kid_subsets: int, n_generated: int, n_reference: int | None, seed: int) -> dict[str, dict]:
    """:func:`debias.metrics.intervals.score_intervals` of the scores of :func:`_scores`."""
    stats = _statistics(ref, "sfid" in metrics)
    features = {"fid": gen["2048"].double().numpy(),
                **({"sfid": gen["spatial"].double().numpy()} if "sfid" in metrics else {})}
    reference = {"fid": (stats.mu, stats.sigma), "sfid": (stats.mu_s, stats.sigma_s)}
    return score_intervals(features, reference, scores, replicates=replicates, level=level, infinity=infinity,
                           kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, n_generated=n_generated,
                           n_reference=n_reference, seed=seed)


def _frechet(features: Tensor, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """The Fréchet distance of generated features (N, D) to reference statistics μ_r (D,), Σ_r (D, D), float64.

    N < D (a few hundred samples against 2048-d features): :class:`debias.metrics.intervals.FrechetToReference`,
    an N×N eigenproblem after the reference's square root, computed once per reference and process, so that
    scoring many step counts, solvers or snapshots costs one D×D root in all; it takes the rank-deficient
    covariance's zero eigenvalues as exact zeros, where the D×D route adds ~√ε of round-off for each (the
    two differ by 2e-7–8e-7 relative on the default run's 128 Inception features, by ~3e-8 on Gaussian ones:
    tests/test_intervals.py), and it is the estimate the bootstrap interval resamples.
    N ≥ D: the D×D route of :func:`debias.metrics.frechet.frechet_distance`.
    """
    x = features.to(torch.float64).numpy()
    if len(x) < x.shape[1]:
        return FrechetToReference(x, mu_ref, sigma_ref)()
    return frechet_distance(x.mean(axis=0), np.cov(x, rowvar=False), mu_ref, sigma_ref)


def _scores(gen: dict[str, Tensor], ref: dict[str, Tensor] | FeatureStats, metrics: Sequence[str],
            kid_subset_size: int, kid_subsets: int, pr_k: int, seed: int) -> dict[str, Any]:
    """Metric values from generated features {layer: (N, D)} and reference features or statistics."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    scores: dict[str, Any] = {}
    if {"fid", "sfid"} & set(metrics):
        b = _statistics(ref, "sfid" in metrics)
        if "fid" in metrics:
            scores["fid"] = _frechet(gen["2048"], b.mu, b.sigma)
        if "sfid" in metrics:
            scores["sfid"] = _frechet(gen["spatial"], b.mu_s, b.sigma_s)
    if "kid" in metrics:
        kid = kid_features_to_metric(gen["2048"], ref["2048"], kid_subsets=kid_subsets,
                                     kid_subset_size=kid_subset_size, rng_seed=seed, verbose=False)
        scores["kid"] = kid["kernel_inception_distance_mean"]
        scores["kid_std"] = kid["kernel_inception_distance_std"]
    if "pr" in metrics:
        prc = prc_features_to_metric(gen["2048"], ref["2048"], prc_neighborhood=pr_k, prc_batch_size=1024,
                                     save_cpu_ram=True, verbose=False)
        scores["precision"], scores["recall"] = prc["precision"], prc["recall"]
    if "isc" in metrics:
        isc = isc_features_to_metric(gen["logits_unbiased"], rng_seed=seed)
        scores["isc"], scores["isc_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    return scores
