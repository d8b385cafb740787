"""The `debias` command line: thin Typer wrappers over the library, one module per group of commands
(:mod:`debias.cli.app` holds what they share). Every command turns a
:class:`~debias.errors.DebiasError` into one line on stderr and exit code 2."""

from debias.cli import train, sample, evaluate, tools, sweep  # noqa: F401, I001  (each registers its commands, in this order)
from debias.cli.app import app, main

__all__ = ["app", "main"]
