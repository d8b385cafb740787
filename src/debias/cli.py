"""The `debias` command line: thin Typer wrappers over the library.

Every command turns a :class:`~debias.errors.DebiasError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import torch
import typer
import yaml

from debias import __version__
from debias.config import load_config
from debias.errors import DebiasError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, sample and score diffusion models with any target and loss weighting.")


def user_errors(fn: Callable) -> Callable:
    """Decorate a command so that user errors become one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DebiasError as err:
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
    """Train one recipe (resumable; under `torchrun --nproc-per-node N -m debias train` with DDP)."""
    from debias.training import train

    result = train(load_config(params, set_ or []), out, resume=resume, progress=progress)
    if result.is_main_process:
        loss = f", last logged loss {result.loss:.4g}" if result.loss is not None else ""
        done = "already finished" if result.step == result.start_step else f"trained steps {result.start_step}→{result.step}"
        typer.echo(f"{result.checkpoint}: {done}{loss}")


@app.command("info")
def info_command() -> None:
    """Versions, devices, and the registered weightings, targets, schedules and solvers."""
    from debias.config import SOLVERS
    from debias.diffusion.schedule import SCHEDULES
    from debias.diffusion.targets import TARGETS
    from debias.diffusion.weighting import WEIGHTINGS

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
    steps: int = typer.Option(20, "--steps", help="Model evaluations (at most the model's diffusion steps)."),
    num_samples: int = typer.Option(64, "--num-samples", "-n", help="How many images."),
    seed: int = typer.Option(0, "--seed", help="Sample i depends only on (seed, i)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="A .png grid or an .npz file (uint8 N×C×H×W)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="A folder of PNGs, one per sample."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per model call (does not change the images)."),
    class_label: Optional[list[int]] = typer.Option(None, "--class-label", help="Class label(s), cycled over samples; default random per sample."),
    spacing: str = typer.Option("even", "--spacing", help="Timesteps: even (guided-diffusion), linspace, leading, trailing."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM η (0 = deterministic)."),
    order: Optional[int] = typer.Option(None, "--order", help="DPM-Solver / UniPC order (1-3, default 2)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="UniPC B(h): bh1 or bh2 (default bh2)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the first EMA's weights (if the checkpoint has any)."),
    clip: bool = typer.Option(True, "--clip/--no-clip", help="Clip the predicted x0 to [-1, 1] at every step."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
) -> None:
    """Sample images from a checkpoint with any solver."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from debias.sampling import sample_checkpoint, writer_for

    write = writer_for(out, out_dir)
    options = {k: v for k, v in {"eta": eta, "order": order, "variant": variant}.items() if v is not None}
    columns = (TextColumn(f"{solver} {steps} steps"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("sample", total=None)
        images = sample_checkpoint(checkpoint, solver, steps, num_samples, seed, batch_size,
                                   class_labels=class_label, spacing=spacing, clip_x0=clip, ema=ema, device=device,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total),
                                   **options)
    path = write(images)
    typer.echo(f"{path}: {len(images)} samples ({solver}, {steps} steps, seed {seed})")


def main() -> None:
    """Entry point for `python -m debias`."""
    app(prog_name="debias")
