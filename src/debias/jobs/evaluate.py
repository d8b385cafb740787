"""Job `evaluate`: FID / sFID / KID / precision-recall — and the Inception Score when the Inception weights
have logits — of generated images against a reference, on every visible GPU."""

from __future__ import annotations

from typing import Any

import torch

from debias.config import Config, EvalConfig
from debias.errors import DebiasError
from debias.images import open_npz_images
from debias.io import write_json, write_tsv
from debias.metrics.features import Features, FeatureStats, load_reference
from debias.metrics.inception import resolve_inception_weights
from debias.metrics.scores import HEADLINE, Source, compute_metrics
from debias.pipeline import REFERENCE_FEATURES, intervals_file, metrics_file, provenance_file, samples_file, steps_table
from debias.progress import Progress, Report
from debias.runtime import on_devices


def score(e: EvalConfig, generated: Source, reference: Source, device: torch.device,
          progress: Report | None = None) -> dict[str, Any]:
    """The metrics of ``eval.metrics`` (plus ``isc`` when the weights have logits and the generated side is
    images), their ``intervals`` (eval.bootstrap, eval.interval_level, eval.fid_infinity) and their
    ``provenance``, as :func:`debias.metrics.scores.compute_metrics` returns them."""
    weights = resolve_inception_weights(e.inception_weights)
    images = not isinstance(generated, (Features, FeatureStats))
    metrics = [*e.metrics, *(["isc"] if weights.has_logits and images and "isc" not in e.metrics else [])]
    result = compute_metrics(generated, reference, weights=weights, metrics=metrics, kid_subset_size=e.kid_subset_size,
                             pr_k=e.pr_k, batch_size=e.batch_size, device=str(device), bootstrap=e.bootstrap,
                             interval_level=e.interval_level, fid_infinity=e.fid_infinity, progress=progress)
    if not weights.has_logits:
        result["provenance"]["isc"] = (f"not computed: the {weights.source} Inception weights have no logits; set "
                                       "eval.inception_weights to torch-fidelity's pt_inception-2015-12-05 weights for it")
    return result


def interval_columns(intervals: dict[str, dict]) -> dict[str, float | None]:
    """The per-step table's columns of :func:`score`'s ``intervals``: ``fid_low``, ``fid_high``, ``sfid_low``, …,
    ``kid_low``, ``kid_high`` and ``fid_infinity``."""
    columns = {f"{metric}_{end}": intervals[metric][end] for metric in ("fid", "sfid", "kid") if metric in intervals
               for end in ("low", "high")}
    return {**columns, **({"fid_infinity": intervals["fid_infinity"]["value"]} if "fid_infinity" in intervals else {})}


def evaluate_stage(cfg: Config, argv: list[str]) -> None:
    """Stage ``evaluate@<solver>``: every step count's samples (read chunk by chunk) against the prepared
    reference. metrics/<solver>.json holds the headline (the first of sample.steps) as DVC metrics; the
    per-step table (with the interval bounds), the intervals of each step count and the provenance go
    beside it, so that `dvc exp show` keeps one column per score."""
    if len(argv) != 2:
        raise DebiasError("usage: stages/evaluate.py SOLVER")
    solver, e = argv[1], cfg.eval
    with on_devices(e.device, argv) as (ranks, device):
        reference = load_reference(REFERENCE_FEATURES)
        rows, intervals, provenance = [], {}, {}
        for steps in cfg.sample.steps:
            with Progress(f"evaluate@{solver} {steps} steps", "images", enabled=ranks.main) as progress:
                result = score(e, open_npz_images(samples_file(solver, steps)), reference, device, progress)
            provenance, intervals[str(steps)] = result.pop("provenance"), result.pop("intervals", {})
            rows.append({"steps": steps, **result, **interval_columns(intervals[str(steps)]),
                         "seconds": provenance["seconds"]})
        if ranks.main:
            headline = rows[0]
            write_json(metrics_file(solver), {solver: {key: headline[key] for key in HEADLINE if key in headline}})
            write_tsv(steps_table(solver), rows)
            write_json(intervals_file(solver), intervals)
            write_json(provenance_file(solver), {**provenance, "headline_steps": headline["steps"],
                                                 "seconds": [row["seconds"] for row in rows]})
