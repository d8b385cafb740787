"""The `debias` command line: thin Typer wrappers over the library.

Every command turns a :class:`~debias.errors.DebiasError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import torch
import typer
import yaml

from debias import __version__
from debias.config import AnalyzeConfig, EvalConfig, SampleConfig, load_config
from debias.errors import DebiasError

# option defaults are the params' defaults (which params.yaml spells out)
SAMPLE, EVAL, ANALYZE = SampleConfig(), EvalConfig(), AnalyzeConfig()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, sample and score diffusion models with any target and loss weighting.")


class _Stderr(logging.Handler):
    """Log records on whatever ``sys.stderr`` is when they are emitted (Typer's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


@app.callback()
def _setup() -> None:
    """The library's notes (resumed runs, skipped snapshots) go to stderr, one line each."""
    logger = logging.getLogger("debias")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)
        logger.propagate = False


@contextlib.contextmanager
def on_devices(devices: str) -> Iterator[tuple]:
    """Run this command on ``devices``: with several visible GPUs (cuda/auto) relaunch it under torchrun,
    one process per GPU, then join the process group; yields (ranks, this rank's device)."""
    from debias.runtime import processes, relaunch_on_all_gpus

    relaunch_on_all_gpus(devices, ["-m", "debias", *sys.argv[1:]])
    with processes(devices) as (ranks, device):
        yield ranks, device


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr; yields the ``progress(done, total)`` callback the library takes."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    console = Console(stderr=True)  # no bar (not even a blank line) when stderr is not a terminal
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def user_errors(fn: Callable) -> Callable:
    """Decorate a command so that user errors become one line and exit code 2 (under torchrun every
    rank exits so, rank 0 alone prints the line)."""
    from debias.runtime import launched_as_main

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DebiasError as err:
            if launched_as_main():
                typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


PARAMS_OPTION = typer.Option("params.yaml", "--params", "-p", help="The params file.")
SET_OPTION = typer.Option(None, "--set", "-S", help="Override a param: key.sub=value (repeatable), as `dvc exp run -S`.")


@app.command("config")
@user_errors
def config_command(params: Path = PARAMS_OPTION, set_: Optional[list[str]] = SET_OPTION) -> None:
    """Validate a params file (plus overrides) and print the resolved configuration as YAML."""
    cfg = load_config(params, set_ or [])
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())


@app.command("train")
@user_errors
def train_command(params: Path = PARAMS_OPTION, set_: Optional[list[str]] = SET_OPTION,
                  out: Path = typer.Option(Path("models"), "--out", "-o", help="Folder for checkpoint.pt, snapshots and logs."),
                  resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/checkpoint.pt if present."),
                  progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal.")) -> None:
    """Train one recipe (resumable). With train.devices cuda/auto it uses every visible GPU (DDP
    through torchrun); under `torchrun --nproc-per-node N -m debias train` likewise."""
    from debias.runtime import relaunch_on_all_gpus
    from debias.train.loop import train

    cfg = load_config(params, set_ or [])
    relaunch_on_all_gpus(cfg.train.devices, ["-m", "debias", *sys.argv[1:]])
    result = train(cfg, out, resume=resume, progress=progress)
    if result.is_main_process:
        loss = f", last logged loss {result.loss:.4g}" if result.loss is not None else ""
        done = "already finished" if result.step == result.start_step else f"trained steps {result.start_step}→{result.step}"
        typer.echo(f"{result.checkpoint}: {done}{loss}")


@app.command("info")
def info_command() -> None:
    """Versions, devices, and the registered weightings, targets, schedules and solvers."""
    from debias.diffusion.schedule import SCHEDULES
    from debias.diffusion.targets import TARGETS
    from debias.diffusion.weighting import WEIGHTINGS
    from debias.samplers import SOLVERS

    cuda = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
    rows = [("debias", __version__), ("torch", f"{torch.__version__} ({cuda})"),
            ("weightings", ", ".join(WEIGHTINGS)), ("targets", ", ".join(TARGETS)),
            ("schedules", ", ".join(SCHEDULES)), ("solvers", ", ".join(SOLVERS))]
    for key, value in rows:
        typer.echo(f"{key:<11} {value}")


@app.command("sample")
@user_errors
def sample_command(
    checkpoint: Path = typer.Argument(..., help="A debias checkpoint (.pt)."),
    solver: str = typer.Option("ddim", "--solver", "-s", help="ddpm, ddim, dpmsolver, dpmsolver++ or unipc."),
    steps: int = typer.Option(SAMPLE.steps[0], "--steps", help="Model evaluations (at most the model's diffusion steps)."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help=f"How many images (default {SAMPLE.num_samples}, or the rows of --init-noise)."),
    seed: int = typer.Option(SAMPLE.seed, "--seed", help="Sample i depends only on (seed, i)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="A .png grid or an .npz file (uint8 N×C×H×W)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="A folder of PNGs, one per sample."),
    format: str = typer.Option("debias", "--format", help="For an .npz: debias (images, N×C×H×W) or adm (arr_0, N×H×W×C as guided-diffusion's batches)."),
    float32: bool = typer.Option(False, "--float32", help="Write the unrounded float32 samples to the .npz (images), not uint8."),
    init_noise: Optional[Path] = typer.Option(None, "--init-noise", help="An .npz with x_T, float N×C×H×W (sample i starts from row i)."),
    batch_size: int = typer.Option(SAMPLE.batch_size, "--batch-size", "-b", help="Images per model call (does not change the images)."),
    class_label: Optional[list[int]] = typer.Option(None, "--class-label", help="Class label(s), cycled over samples; default random per sample."),
    preset: str = typer.Option(SAMPLE.preset, "--preset", help="none, or upstream: sample exactly as the paper's code (options below still override)."),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="even, ddim, linspace, leading, trailing, time_uniform, logSNR, time_quadratic (default: the solver's own)."),
    denoise_to_zero: Optional[bool] = typer.Option(None, "--denoise-to-zero/--no-denoise-to-zero", help=f"End at σ = 0, or at the grid's last noise level (default {SAMPLE.denoise_to_zero})."),
    arithmetic: Optional[str] = typer.Option(None, "--arithmetic", help=f"debias, or upstream: the original's float arithmetic (default {SAMPLE.arithmetic})."),
    eta: Optional[float] = typer.Option(None, "--eta", help=f"DDIM η (default {SAMPLE.eta}: deterministic)."),
    order: Optional[int] = typer.Option(None, "--order", help=f"DPM-Solver / UniPC order (1-3, default {SAMPLE.order})."),
    variant: Optional[str] = typer.Option(None, "--variant", help=f"UniPC B(h): bh1 or bh2 (default {SAMPLE.unipc_variant})."),
    lower_order_final: Optional[int] = typer.Option(None, "--lower-order-final", help=f"DPM-Solver: runs of fewer steps lower their final orders (default {SAMPLE.lower_order_final}; 0 never)."),
    ema: bool = typer.Option(SAMPLE.ema, "--ema/--no-ema", help="Use the first EMA's weights (if the checkpoint has any)."),
    clip: Optional[bool] = typer.Option(None, "--clip/--no-clip", help=f"Clip the predicted x0 to [-1, 1] at every step (default {SAMPLE.clip_x0})."),
    device: str = typer.Option(SAMPLE.device, "--device", help="auto (every visible GPU, else the CPU), cpu, cuda or cuda:N."),
    chunk_size: int = typer.Option(SAMPLE.chunk_size, "--chunk-size", help="Samples per chunk file: the unit of streaming and resuming."),
    precision: str = typer.Option(SAMPLE.precision, "--precision", help="fp32 (exact on CPU, TF32 matmuls on CUDA), bf16, or fp16 (CUDA): autocast for the network."),
    compile: bool = typer.Option(SAMPLE.compile, "--compile", help="torch.compile the network (warm-up: seconds to minutes)."),
) -> None:
    """Sample images from a checkpoint with any solver. Samples stream to disk in chunks (a hidden
    ``.OUT.chunks`` folder beside the output, removed when done): a killed run resumes where it stopped.
    With --device auto/cuda it uses every visible GPU (through torchrun)."""
    from dataclasses import replace

    from debias.images import read_noise
    from debias.runtime import autocast_dtype
    from debias.sampling import prepare_sampler
    from debias.streaming import remove_chunks, sample_to_file

    path, kind = output_for(out, out_dir, format, float32)
    overrides = {k: v for k, v in dict(eta=eta, order=order, variant=variant, lower_order_final=lower_order_final,
                                       spacing=spacing, denoise_to_zero=denoise_to_zero, arithmetic=arithmetic,
                                       clip_x0=clip).items() if v is not None}
    noise = read_noise(init_noise) if init_noise is not None else None
    if noise is not None and num_samples is not None and num_samples > len(noise):
        raise DebiasError(f"--init-noise {init_noise} has {len(noise)} rows, fewer than -n {num_samples}")
    count = num_samples if num_samples is not None else len(noise) if noise is not None else SAMPLE.num_samples
    cfg = replace(SAMPLE, preset=preset, steps=[steps], num_samples=count, seed=seed, batch_size=batch_size, ema=ema,
                  precision=precision, compile=compile, device=device, chunk_size=chunk_size)
    with on_devices(device) as (ranks, this_device):
        autocast_dtype(precision, this_device)
        sampler = prepare_sampler(checkpoint, solver, cfg, class_labels=class_label, init_noise=noise,
                                  float32=float32, device=str(this_device), **overrides)
        chunks = path.parent / f".{path.name}.chunks"
        with progress_bar(f"{solver} {steps} steps") as progress:
            sample_to_file(sampler, steps, path, kind, chunks, chunk_size, progress if ranks.main else None)
        if ranks.main:
            remove_chunks(chunks)
            typer.echo(f"{path}: {count} samples ({solver}, {steps} steps, seed {seed})")


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


@app.command("fid")
@user_errors
def fid_command(
    generated: str = typer.Argument(..., help="An .npz of uint8 images, an image folder, or a built-in dataset name."),
    reference: str = typer.Argument(..., help="The same kinds, an ADM reference batch (arr_0, or mu/sigma statistics), or a features .npz of the prepare stage."),
    metrics: list[str] = typer.Option(EVAL.metrics, "--metric", "-m", help="fid, sfid, kid, pr, isc (repeatable)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Inception weights file (default: offline standard weights)."),
    kid_subset_size: int = typer.Option(EVAL.kid_subset_size, "--kid-subset-size", help="KID subset size (<= both set sizes)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Use at most N images of each side."),
    batch_size: int = typer.Option(EVAL.batch_size, "--batch-size", "-b"),
    device: str = typer.Option(EVAL.device, "--device", help="auto (every visible GPU, else the CPU), cpu, cuda or cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the result as JSON here."),
) -> None:
    """FID / sFID / KID / precision-recall between two image sets, offline (.npz images are read batch by batch)."""
    from debias.io import write_json
    from debias.metrics.scores import compute_metrics
    from debias.sources import image_source

    gen = image_source(generated, max_images=max_images)
    ref = image_source(reference, like=gen, max_images=max_images)
    with on_devices(device) as (ranks, this_device):
        with progress_bar("Inception features") as progress:
            result = compute_metrics(gen, ref, weights=weights, metrics=metrics, kid_subset_size=kid_subset_size,
                                     batch_size=batch_size, device=str(this_device),
                                     progress=progress if ranks.main else None)
    if not ranks.main:
        return
    if out is not None:
        write_json(out, result)
    for key, value in result.items():
        if key != "provenance":
            typer.echo(f"{key:<10} {value:.6g}")
    p = result["provenance"]
    reference_size = p["n_reference"] if p["n_reference"] is not None else "reference statistics"
    typer.echo(f"({p['n_generated']} vs {reference_size} images, {p['extractor']}, weights {p['weights_sha256'][:12]}…)")


@app.command("analyze")
@user_errors
def analyze_command(
    checkpoint: Path = typer.Argument(..., help="A debias checkpoint."),
    data: str = typer.Option("digits", "--data", help="Real images: a built-in dataset name, an image folder or an .npz."),
    out_dir: Path = typer.Option(Path("analysis"), "--out-dir", "-o"),
    num_images: int = typer.Option(ANALYZE.num_images, "--num-images"),
    timesteps: int = typer.Option(ANALYZE.timesteps, "--timesteps", help="Timesteps evaluated, spread evenly over the chain."),
    solver: str = typer.Option(ANALYZE.color_solver, "--solver", help="Solver for the colour-shift curve."),
    steps: list[int] = typer.Option(ANALYZE.color_steps, "--steps", help="Step counts for the colour-shift curve (repeatable)."),
    num_samples: int = typer.Option(ANALYZE.color_samples, "--num-samples", "-n"),
    seed: int = typer.Option(ANALYZE.seed, "--seed"),
    batch_size: int = typer.Option(SAMPLE.batch_size, "--batch-size", "-b"),
    ema: bool = typer.Option(SAMPLE.ema, "--ema/--no-ema"),
    device: str = typer.Option(ANALYZE.device, "--device", help="auto (every visible GPU, else the CPU), cpu, cuda or cuda:N."),
) -> None:
    """The paper's evidence for one model: x0 bias per timestep and colour shift vs sampling steps."""
    from dataclasses import replace

    from debias.analysis import channel_means, write_bias_analysis, write_color_analysis
    from debias.images import ImageArray, from_uint8
    from debias.models.factory import load_model
    from debias.runtime import prepare_network
    from debias.sources import image_source

    model = load_model(checkpoint, ema=ema)
    images = image_source(data, shape=model.image_shape[:2])
    if not isinstance(images, (torch.Tensor, ImageArray)):
        raise DebiasError("--data must be images, not precomputed features")
    images = images[:]
    with on_devices(device) as (ranks, this_device):
        model.network = prepare_network(model.network, this_device)
        write_bias_analysis(model, from_uint8(images[:num_images]), None, timesteps=timesteps, seed=seed,
                            batch_size=batch_size, tsv=out_dir / "x0_bias.tsv", png=out_dir / "x0_bias.png",
                            device=this_device)
        cfg = replace(SAMPLE, steps=steps, num_samples=num_samples, seed=seed, batch_size=batch_size, ema=ema)
        write_color_analysis(checkpoint, channel_means(images), solver, cfg, tsv=out_dir / "color_shift.tsv",
                             png=out_dir / "color_shift.png", grid_png=out_dir / "color_grid.png",
                             device=str(this_device))
    if ranks.main:
        typer.echo(f"{out_dir}: x0_bias.tsv/png, color_shift.tsv/png, color_grid.png")


@app.command("compare")
@user_errors
def compare_command(
    exp_json: Optional[Path] = typer.Option(None, "--exp-json", help="Output of `dvc exp show --json` (default: run it here)."),
    out_dir: Path = typer.Option(Path("reports/compare"), "--out-dir", "-o"),
) -> None:
    """The paper-style comparison across DVC experiments: FID per recipe and solver, and the
    x0-bias / colour-shift / FID-vs-training curves of every experiment overlaid."""
    from debias.report import compare_experiments

    if exp_json is not None:
        try:
            table = json.loads(exp_json.read_text())
        except (OSError, ValueError) as err:
            raise DebiasError(f"cannot read {exp_json}: {err}") from None
    else:
        try:
            shown = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            raise DebiasError(f"`dvc exp show --json` failed here: {getattr(err, 'stderr', '') or err}".strip()) from None
        table = json.loads(shown.stdout)
    written = compare_experiments(table, out_dir)
    typer.echo(", ".join(str(p) for p in written))


@app.command("convert")
@user_errors
def convert_command(
    state_dict: Path = typer.Argument(..., help="A bare state dict saved by the original code (e.g. ema_0.9999_500000.pt)."),
    flags: str = typer.Option(..., "--flags", help='Its training flags, e.g. "--image_size 256 --num_channels 128 --learn_sigma True".'),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the debias checkpoint."),
) -> None:
    """Import a checkpoint of the original implementation (guided-diffusion / the paper's fork)."""
    from debias.convert import convert_checkpoint, parse_flags

    ckpt = convert_checkpoint(state_dict, parse_flags(flags), out)
    cfg = ckpt.config
    typer.echo(f"{out}: {cfg['data']['image_size']}x{cfg['data']['image_size']} UNet, target {cfg['target']}, "
               f"{cfg['diffusion']['schedule']} schedule, T={cfg['diffusion']['steps']}")


def main() -> None:
    """Entry point for `python -m debias`."""
    app(prog_name="debias")
