"""`debias compare` (recipes across DVC experiments) and `debias convert` (the original's checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from debias.cli.app import app, user_errors
from debias.errors import DebiasError

COMPARE = Path("compare")  # outside every pipeline output, so `dvc status` stays clean


@app.command("compare")
@user_errors
def compare_command(
    exp_json: Optional[Path] = typer.Option(None, "--exp-json", help="Output of `dvc exp show --json` (default: run it here)."),
    out_dir: Path = typer.Option(COMPARE, "--out-dir", "-o", help="Where comparison.md and the PNGs go."),
) -> None:
    """Compare recipes across DVC experiments, as the paper does.

    FID per recipe and solver, and the x0-bias, colour-shift and FID-vs-training curves of every recipe
    overlaid. Each recipe appears once, named by the params that set it apart."""
    import json
    import subprocess
    import sys

    from debias.report import compare_experiments

    if exp_json is not None:
        try:
            table = json.loads(exp_json.read_text())
        except (OSError, ValueError) as err:
            raise DebiasError(f"cannot read {exp_json}: {err}") from None
    else:
        shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if shown.returncode != 0:
            last = (shown.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise DebiasError(f"`dvc exp show --json` failed here: {last}")
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
    """Import a checkpoint of the original code (guided-diffusion, the paper's fork)."""
    from debias.convert import convert_checkpoint, parse_flags

    ckpt = convert_checkpoint(state_dict, parse_flags(flags), out)
    cfg = ckpt.config
    typer.echo(f"{out}: {cfg['data']['image_size']}x{cfg['data']['image_size']} UNet, target {cfg['target']}, "
               f"{cfg['diffusion']['schedule']} schedule, T={cfg['diffusion']['steps']}")
