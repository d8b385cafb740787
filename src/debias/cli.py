"""The `debias` command line: thin Typer wrappers over the library.

Every command turns a :class:`~debias.errors.DebiasError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
from typing import Callable

import typer

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


def main() -> None:
    """Entry point for `python -m debias`."""
    app(prog_name="debias")
