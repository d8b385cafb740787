"""`debias fid` and `debias analyze`: the pipeline's evaluation and analysis for any images or model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from debias import catalog
from debias.cli.app import (DEVICE_HELP, PARAMS_OPTION, SET_OPTION, Solver, app, command_line, echo_main, load_params,
                            user_errors, with_flags)
from debias.errors import DebiasError


@app.command("fid")
@user_errors
def fid_command(
    generated: str = typer.Argument(..., help="An .npz of uint8 images, an image folder, or a built-in dataset name."),
    reference: Optional[str] = typer.Argument(None, help="The same kinds, an ADM reference batch (arr_0, or mu/sigma statistics), or a features .npz of the prepare stage (default: the pipeline's reference, eval.reference or the training set)."),
    params: Optional[Path] = PARAMS_OPTION,
    set_: Optional[list[str]] = SET_OPTION,
    metrics: Optional[list[str]] = typer.Option(None, "--metric", "-m", help=f"{', '.join(catalog.METRICS)}; repeatable (default: eval.metrics)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Inception weights file (default: eval.inception_weights, else the offline standard weights)."),
    kid_subset_size: Optional[int] = typer.Option(None, "--kid-subset-size", help="KID subset size, <= both set sizes (default: eval.kid_subset_size)."),
    pr_k: Optional[int] = typer.Option(None, "--pr-k", help="k of the precision/recall k-NN (default: eval.pr_k)."),
    reference_images: Optional[int] = typer.Option(None, "--reference-images", help="A fixed random subset of N reference images, as the pipeline takes (default: eval.reference_images; -S eval.reference_images=null for all)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Use at most the first N images of each side."),
    bootstrap: Optional[int] = typer.Option(None, "--bootstrap", help="Resamples of the FID/sFID bootstrap interval, 0 for none (default: eval.bootstrap)."),
    level: Optional[float] = typer.Option(None, "--level", help="Level of the intervals, e.g. 0.95 (default: eval.interval_level)."),
    fid_infinity: Optional[bool] = typer.Option(None, "--fid-infinity/--no-fid-infinity", help="Also FID∞, extrapolated to infinitely many samples (default: eval.fid_infinity)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per Inception call (default: eval.batch_size)."),
    device: Optional[str] = typer.Option(None, "--device", help=f"{DEVICE_HELP} (default: eval.device)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the result as JSON here."),
) -> None:
    """FID, sFID, KID and precision/recall of images against a reference, offline, with intervals.

    The eval params of params.yaml (plus -S) apply, replaced by these options, so `debias fid
    samples.npz` scores like the pipeline's evaluate stage. .npz images are read batch by batch. Without a
    REFERENCE, the prepare stage's data/reference_features.npz is used while its Inception weights and reference
    settings are these (a note says whether)."""
    from debias.data.datasets import load_dataset
    from debias.images import to_uint8
    from debias.io import write_json
    from debias.jobs.evaluate import score
    from debias.metrics.inception import resolve_inception_weights
    from debias.pipeline import REFERENCE_FEATURES
    from debias.progress import Progress
    from debias.runtime import on_devices
    from debias.sources import fid_reference, image_source, stored_reference

    cfg = load_params(params, set_)
    e = with_flags(cfg.eval, metrics=metrics or None, inception_weights=None if weights is None else str(weights),
                   kid_subset_size=kid_subset_size, pr_k=pr_k, reference_images=reference_images, bootstrap=bootstrap,
                   interval_level=level, fid_infinity=fid_infinity, batch_size=batch_size, device=device)
    gen = image_source(generated, max_images=max_images)
    ref, note = None, None
    if reference is None and max_images is None:  # the pipeline's reference, which the prepare stage may have stored
        sha256 = resolve_inception_weights(e.inception_weights).sha256
        ref, note = stored_reference(REFERENCE_FEATURES, e, cfg.data, sha256, gen)
    if ref is None:
        ref = fid_reference(e, lambda: to_uint8(load_dataset(cfg.data).images), reference, like=gen,
                            max_images=max_images)
    with on_devices(e.device, command_line()) as (ranks, this_device):
        if note is not None and ranks.main:
            typer.echo(note, err=True)
        with Progress("Inception features", "images", enabled=ranks.main) as progress:
            result = score(e, gen, ref, this_device, progress)
    if not ranks.main:
        return
    if out is not None:
        write_json(out, result)
    intervals = result.get("intervals", {})
    for key, value in result.items():
        if key not in ("provenance", "intervals"):
            found = intervals.get(key, {})
            bounds = f"  [{found['low']:.6g}, {found['high']:.6g}]" if found.get("low") is not None else ""
            typer.echo(f"{key:<10} {value:.6g}{bounds}")
    if "fid_infinity" in intervals:
        typer.echo(f"{'fid_inf':<10} {intervals['fid_infinity']['value']:.6g}")
    if any(found.get("low") is not None for found in intervals.values()):
        typer.echo(f"[{e.interval_level:.0%} intervals: FID/sFID a bootstrap of the generated samples against the fixed "
                   "reference statistics, KID its standard error]")
    p = result["provenance"]
    reference_size = p["n_reference"] if p["n_reference"] is not None else "reference statistics"
    typer.echo(f"({p['n_generated']} vs {reference_size} images, {p['extractor']}, weights {p['weights_sha256'][:12]}…)")


@app.command("analyze")
@user_errors
def analyze_command(
    checkpoint: Path = typer.Argument(..., help="A debias checkpoint."),
    out_dir: Path = typer.Option(Path("analysis"), "--out-dir", "-o", help="Where the TSVs and figures go."),
    data: Optional[str] = typer.Option(None, "--data", help="Real images: a built-in dataset name, an image folder or an .npz (default: the training set of the params' data section)."),
    params: Optional[Path] = PARAMS_OPTION,
    set_: Optional[list[str]] = SET_OPTION,
    num_images: Optional[int] = typer.Option(None, "--num-images", help="Real images for the x0 bias (default: analyze.num_images)."),
    timesteps: Optional[int] = typer.Option(None, "--timesteps", help="Timesteps evaluated, spread evenly over the chain (default: analyze.timesteps)."),
    solver: Optional[Solver] = typer.Option(None, "--solver", help="Solver of the colour-shift curve (default: analyze.color_solver)."),
    steps: Optional[list[int]] = typer.Option(None, "--steps", help="Step counts of the colour-shift curve, repeatable (default: analyze.color_steps)."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="Samples per step count (default: analyze.color_samples)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Noise and sampling seed (default: analyze.seed)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per model call (default: sample.batch_size)."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Use the first EMA's weights (default: sample.ema)."),
    device: Optional[str] = typer.Option(None, "--device", help=f"{DEVICE_HELP} (default: analyze.device)."),
) -> None:
    """The paper's evidence for one model: x0 bias and colour shift.

    The x0 bias per timestep and the colour shift against sampling steps, with the analyze and sample
    params of params.yaml (plus -S), replaced by these options."""
    import torch

    from debias.data.datasets import load_dataset
    from debias.images import ImageArray, to_uint8
    from debias.jobs.analyze import AnalysisFiles, analyze
    from debias.models.factory import load_model
    from debias.runtime import on_devices
    from debias.sources import image_source

    cfg = load_params(params, set_)
    a = with_flags(cfg.analyze, num_images=num_images, timesteps=timesteps, color_solver=solver,
                   color_steps=steps or None, color_samples=num_samples, seed=seed, device=device)
    s = with_flags(cfg.sample, batch_size=batch_size, ema=ema)
    shape = load_model(checkpoint, ema=s.ema).image_shape
    images = to_uint8(load_dataset(cfg.data).images) if data is None else image_source(data, shape=shape[:2])
    if not isinstance(images, (torch.Tensor, ImageArray)):
        raise DebiasError("--data must be images, not precomputed features")
    if tuple(images.shape[1:] if isinstance(images, torch.Tensor) else images.image_shape) != tuple(shape):
        raise DebiasError(f"the images are {tuple(images.shape[1:])}, the model's are {tuple(shape)}; "
                          "give --data of the model's shape")
    with on_devices(a.device, command_line()) as (ranks, this_device):
        analyze(a, s, cfg.eval, checkpoint, images[:], None, AnalysisFiles(out_dir, out_dir), ranks=ranks, device=this_device)
        echo_main(ranks, f"{out_dir}: x0_bias.tsv/png, color_shift.tsv/png, color_grid.png")
