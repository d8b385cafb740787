"""Stage `evaluate@<solver>`: FID / sFID / KID / precision-recall (and the Inception Score, when the
Inception weights have logits) of each step count's samples, read chunk by chunk, on every visible GPU.

metrics/<solver>.json holds the headline (the first of sample.steps) as DVC metrics; the per-step table
and the provenance go beside it, as plain outputs."""

from debias.config import Config
from debias.errors import DebiasError
from debias.images import open_npz_images
from debias.io import write_json, write_tsv
from debias.metrics.features import load_reference
from debias.metrics.inception import resolve_inception_weights
from debias.metrics.scores import HEADLINE, compute_metrics
from debias.pipeline import (REFERENCE_FEATURES, metrics_file, on_devices, provenance_file, run_stage, samples_file,
                             steps_table)
from debias.progress import Progress


def main(cfg: Config, args: list[str]) -> None:
    if len(args) != 1:
        raise DebiasError("usage: stages/evaluate.py SOLVER")
    solver, e = args[0], cfg.eval
    with on_devices(e.device, __file__, args) as (ranks, device):
        reference = load_reference(REFERENCE_FEATURES)
        weights = resolve_inception_weights(e.inception_weights)
        metrics = [*e.metrics, *(["isc"] if weights.has_logits and "isc" not in e.metrics else [])]
        rows, provenance = [], None
        for steps in cfg.sample.steps:
            with Progress(f"evaluate@{solver} {steps} steps", "images", enabled=ranks.main) as progress:
                result = compute_metrics(open_npz_images(samples_file(solver, steps)), reference, weights=weights,
                                         metrics=metrics, kid_subset_size=e.kid_subset_size, pr_k=e.pr_k,
                                         batch_size=e.batch_size, device=str(device), progress=progress)
            provenance = result.pop("provenance")
            rows.append({"steps": steps, **result, "seconds": provenance["seconds"]})
        if not weights.has_logits:
            provenance["isc"] = (f"not computed: the {weights.source} Inception weights have no logits; set "
                                 "eval.inception_weights to torch-fidelity's pt_inception-2015-12-05 weights for it")
        if ranks.main:
            headline = rows[0]
            write_json(metrics_file(solver), {solver: {key: headline[key] for key in HEADLINE if key in headline}})
            write_tsv(steps_table(solver), rows)
            write_json(provenance_file(solver), {**provenance, "headline_steps": headline["steps"],
                                                 "seconds": [row["seconds"] for row in rows]})


if __name__ == "__main__":
    run_stage(main)
