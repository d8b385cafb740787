"""`debias sample`: images from a checkpoint with any solver, streamed to disk in resumable chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from debias.cli.app import (DEVICE_HELP, PARAMS_OPTION, SET_OPTION, Arithmetic, Precision, Preset, Solver, Spacing,
                            Variant, app, command_line, echo_main, load_params, user_errors, with_flags)
from debias.errors import DebiasError

FROM_PARAMS = "default: params"


@app.command("sample")
@user_errors
def sample_command(
    checkpoint: Path = typer.Argument(..., help="A debias checkpoint (.pt)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="A .png grid or an .npz file (uint8 N×C×H×W)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="A folder of PNGs, one per sample."),
    params: Optional[Path] = PARAMS_OPTION,
    set_: Optional[list[str]] = SET_OPTION,
    solver: Optional[Solver] = typer.Option(None, "--solver", "-s", help="The solver (default: the first of sample.solvers)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Model evaluations (default: the first of sample.steps)."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="How many images (default: sample.num_samples, or the rows of --init-noise)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sample i depends only on (seed, i) (default: sample.seed)."),
    format: str = typer.Option("debias", "--format", help="For an .npz: debias (images, N×C×H×W) or adm (arr_0, N×H×W×C as guided-diffusion's batches)."),
    float32: bool = typer.Option(False, "--float32", help="Write the unrounded float32 samples to the .npz (images), not uint8."),
    init_noise: Optional[Path] = typer.Option(None, "--init-noise", help="An .npz with x_T, float N×C×H×W (sample i starts from row i)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per model call; does not change the images (default: sample.batch_size)."),
    class_label: Optional[list[int]] = typer.Option(None, "--class-label", help="Class label(s), cycled over samples; default random per sample."),
    preset: Optional[Preset] = typer.Option(None, "--preset", help="upstream: sample exactly as the paper's code; the options below still override (default: sample.preset)."),
    spacing: Optional[Spacing] = typer.Option(None, "--spacing", help="The grid of noise levels; auto is each solver's measured best (default: sample.spacing)."),
    denoise_to_zero: Optional[bool] = typer.Option(None, "--denoise-to-zero/--no-denoise-to-zero", help="End at σ = 0, or at the grid's last noise level (default: sample.denoise_to_zero)."),
    arithmetic: Optional[Arithmetic] = typer.Option(None, "--arithmetic", help="upstream: the original's float arithmetic (default: sample.arithmetic)."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM η (default: sample.eta)."),
    order: Optional[int] = typer.Option(None, "--order", help="DPM-Solver / UniPC order, 1-3 (default: sample.order)."),
    variant: Optional[Variant] = typer.Option(None, "--variant", help="UniPC B(h) (default: sample.unipc_variant)."),
    lower_order_final: Optional[int] = typer.Option(None, "--lower-order-final", help="DPM-Solver: runs of fewer steps lower their final orders; 0 never (default: sample.lower_order_final)."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Use the first EMA's weights, if the checkpoint has any (default: sample.ema)."),
    ema_std: Optional[float] = typer.Option(None, "--ema-std", help="Sample the post-hoc EMA of this σ_rel, rebuilt from the phema/ folder beside the checkpoint (train.ema: phema; default: sample.ema_std)."),
    clip: Optional[bool] = typer.Option(None, "--clip/--no-clip", help="Clip the predicted x0 to [-1, 1] at every step (default: sample.clip_x0)."),
    device: Optional[str] = typer.Option(None, "--device", help=f"{DEVICE_HELP} (default: sample.device)."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Samples per chunk file, the unit of streaming and resuming (default: sample.chunk_size)."),
    precision: Optional[Precision] = typer.Option(None, "--precision", help="Autocast for the network: fp32 (exact on CPU, TF32 on CUDA), bf16, fp16 on CUDA (default: sample.precision)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the network; warm-up takes seconds to minutes (default: sample.compile)."),
) -> None:
    """Sample images from a checkpoint with any solver.

    The sample params of params.yaml (plus -S) apply, replaced by these options. Samples stream to disk in chunks (a hidden .OUT.chunks folder beside the
    output, removed when done): a killed run resumes where it stopped. With --device auto/cuda it uses
    every visible GPU (through torchrun)."""
    from debias.images import read_noise
    from debias.jobs.sample import sample_images
    from debias.runtime import on_devices

    path, kind = output_for(out, out_dir, format, float32)
    cfg = load_params(params, set_)
    noise = read_noise(init_noise) if init_noise is not None else None
    if noise is not None and num_samples is not None and num_samples > len(noise):
        raise DebiasError(f"--init-noise {init_noise} has {len(noise)} rows, fewer than -n {num_samples}")
    count = num_samples if num_samples is not None else len(noise) if noise is not None else cfg.sample.num_samples
    solver = solver or cfg.sample.solvers[0]
    s = with_flags(cfg.sample, steps=None if steps is None else [steps], num_samples=count, seed=seed,
                   batch_size=batch_size, preset=preset, ema=ema, ema_std=ema_std, precision=precision, compile=compile,
                   device=device, chunk_size=chunk_size)
    # the settings a preset fixes: a flag replaces the preset's value, which replaces the param's
    overrides = {k: v for k, v in dict(eta=eta, order=order, variant=variant, lower_order_final=lower_order_final,
                                       spacing=spacing, denoise_to_zero=denoise_to_zero, arithmetic=arithmetic,
                                       clip_x0=clip).items() if v is not None}
    if overrides.get("spacing") == "auto":
        overrides["spacing"] = None
    steps = s.steps[0]
    with on_devices(s.device, command_line()) as (ranks, this_device):
        sample_images(s, solver, checkpoint, {steps: path},
                      {steps: path.parent / f".{path.name}.chunks"}, ranks=ranks, device=this_device, kind=kind,
                      overrides=overrides, class_labels=class_label, init_noise=noise, float32=float32)
        echo_main(ranks, f"{path}: {count} samples ({solver}, {steps} steps, seed {s.seed})")


def output_for(out: Path | None, out_dir: Path | None, format: str = "debias", float32: bool = False) -> tuple[Path, str]:
    """Validate ``--out`` / ``--out-dir`` / ``--format`` / ``--float32`` before any work: (path, kind of
    output, one of :data:`debias.streaming.KINDS`) — a ``.png`` grid, an ``.npz`` (debias or ADM layout,
    or float32), or a folder of PNGs."""
    from debias.images import check_output

    if (out is None) == (out_dir is None):
        raise DebiasError("give exactly one of --out (a .png grid or .npz file) and --out-dir (a folder of PNGs)")
    if format not in ("debias", "adm"):
        raise DebiasError(f"--format {format!r}: choose debias or adm")
    npz = out is not None and out.suffix.lower() == ".npz"
    if (float32 or format == "adm") and not npz:
        raise DebiasError(f"--{'float32' if float32 else 'format adm'} needs an .npz output (--out x.npz)")
    if float32 and format == "adm":
        raise DebiasError("--float32 and --format adm do not combine: ADM batches are uint8")
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise DebiasError(f"--out-dir {out_dir} exists and is not a folder")
        return out_dir, "folder"
    try:
        path = check_output(out)
    except DebiasError as err:
        raise DebiasError(f"--out {err}") from None
    return path, "float32" if float32 else "adm" if format == "adm" else "npz" if npz else "png"
