"""Stage `evaluate@<solver>`: FID / sFID / KID / precision-recall (and the Inception Score, when the
Inception weights have logits) of each step count's samples, read chunk by chunk, on every visible GPU."""

from debias.config import Config
from debias.errors import DebiasError
from debias.images import open_npz_images
from debias.io import write_json, write_tsv
from debias.metrics.features import load_reference
from debias.metrics.inception import resolve_inception_weights
from debias.metrics.scores import compute_metrics
from debias.pipeline import METRICS, REFERENCE_FEATURES, on_devices, run_stage, samples_file


def main(cfg: Config, args: list[str]) -> None:
    if len(args) != 1:
        raise DebiasError("usage: stages/evaluate.py SOLVER")
    solver, e = args[0], cfg.eval
    with on_devices(e.device, __file__, args) as (ranks, device):
        reference = load_reference(REFERENCE_FEATURES)
        weights = resolve_inception_weights(e.inception_weights)
        metrics = [*e.metrics, *(["isc"] if weights.has_logits and "isc" not in e.metrics else [])]
        by_steps, provenance = {}, None
        for steps in cfg.sample.steps:
            result = compute_metrics(open_npz_images(samples_file(solver, steps)), reference, weights=weights,
                                     metrics=metrics, kid_subset_size=e.kid_subset_size, pr_k=e.pr_k,
                                     batch_size=e.batch_size, device=str(device))
            provenance = result.pop("provenance")
            by_steps[str(steps)] = {**result, "seconds": provenance["seconds"]}
        if not weights.has_logits:
            provenance["isc"] = (f"not computed: the {weights.source} Inception weights have no logits; set "
                                 "eval.inception_weights to torch-fidelity's pt_inception-2015-12-05 weights for it")
        if ranks.main:
            headline = by_steps[str(cfg.sample.steps[0])]
            write_json(METRICS / f"{solver}.json", {
                **{k: v for k, v in headline.items() if k != "seconds"}, "steps": cfg.sample.steps[0],
                "by_steps": by_steps, "provenance": provenance})
            write_tsv(METRICS / f"{solver}_vs_steps.tsv", [{"steps": int(k), **v} for k, v in by_steps.items()])


if __name__ == "__main__":
    run_stage(main)
