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


def main() -> None:
    """Entry point for `python -m debias`."""
    app(prog_name="debias")
