"""`debias compare` (recipes across DVC experiments), `debias convert` (the original's checkpoints) and
`debias phema` (an EMA length chosen after training)."""

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

    from debias.comparison import compare_experiments

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


@app.command("phema")
@user_errors
def phema_command(
    checkpoint_dir: Path = typer.Argument(..., help="A folder of post-hoc EMA snapshots (phema-<step>.pt), or a run folder "
                                           "holding phema/: models/phema, checkpoints/<recipe>."),
    std: float = typer.Option(..., "--std", help="The EMA length σ_rel to rebuild, in (0, 0.2887), e.g. 0.13."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the checkpoint."),
    step: Optional[int] = typer.Option(None, "--step", help="Rebuild the EMA as it was at this step (default: the last snapshot).", min=1),
    using: Optional[str] = typer.Option(None, "--using", help="Combine only the stored profiles of these σ_rel, e.g. 0.05,0.10 (default: all)."),
) -> None:
    """Rebuild the EMA of any length from the power-function profiles of a run trained with
    train.ema: phema (EDM2's post-hoc EMA), without retraining."""
    from debias.posthoc import reconstruct_to

    try:
        stds = None if using is None else [float(v) for v in using.split(",")]
    except ValueError:
        raise DebiasError(f"--using must be σ_rel values separated by commas, got {using!r}") from None
    ckpt = reconstruct_to(checkpoint_dir, std, out, step, stds)
    info = ckpt.extra["phema"]
    typer.echo(f"{out}: EMA σ_rel={std:g} at step {ckpt.step} from {len(info['snapshots'])} snapshots "
               f"of {len(info['coefficients']) // len(info['snapshots'])} profiles")
