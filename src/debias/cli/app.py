"""The `debias` Typer app and what its commands share: params resolution, choices, devices, errors.

Start-up imports Typer and :mod:`debias.catalog` only (``debias --help`` in well under a second);
torch and the library load inside the command that needs them.

Every command that runs a job reads ``params.yaml`` (``--params``; the built-in defaults when there is
none) plus ``-S key=value`` overrides, like ``debias train`` and ``dvc exp run -S``; a command-line flag
replaces the param it names. So the pipeline and the CLI share one set of defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import typer
from typer.core import TyperGroup

from debias import __version__, catalog
from debias.errors import one_line, one_line_errors


class OneLineErrors(TyperGroup):
    """The command group whose usage errors (an unknown option, a value outside its choices) are one
    line on stderr and exit code 2, like every other user error, instead of click's usage block."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            print("error: aborted", file=sys.stderr)
            sys.exit(1)
        except typer.TyperException as err:  # typer's click: UsageError, BadParameter, NoSuchOption, …
            if not hasattr(err, "format_message"):
                raise
            if type(err).__name__ == "NoArgsIsHelpError":  # `debias` alone: its message is the help
                print(err.format_message())
                sys.exit(0)
            context = getattr(err, "ctx", None)
            hint = f" (see `{context.command_path} --help`)" if context is not None else ""
            print(f"error: {one_line(err.format_message())}{hint}", file=sys.stderr)
            sys.exit(getattr(err, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Train, sample and score diffusion models with any target and loss weighting.")

# choices, from the catalogue of registry names (no torch import)
Solver = Literal[catalog.SOLVERS]
Weighting = Literal[catalog.WEIGHTINGS]
Target = Literal[catalog.TARGETS]
Spacing = Literal[("auto", *catalog.SPACINGS)]
Precision = Literal[catalog.PRECISIONS]
Preset = Literal[catalog.PRESETS]
Arithmetic = Literal[catalog.ARITHMETIC]
Variant = Literal[catalog.UNIPC_VARIANTS]

PARAMS = Path("params.yaml")
PARAMS_OPTION = typer.Option(None, "--params", "-p",
                             help="The params file (default: ./params.yaml if there is one, else the built-in defaults).")
SET_OPTION = typer.Option(None, "--set", "-S", help="Override a param: key.sub=value (repeatable), as `dvc exp run -S`.")
DEVICE_HELP = "auto (every visible GPU through torchrun, else the CPU), cpu, cuda or cuda:N."


class _Stderr(logging.Handler):
    """Log records on whatever ``sys.stderr`` is when they are emitted (Typer's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"debias {__version__}")
        raise typer.Exit()


@app.callback()
def _setup(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                        help="Print the version and exit.")) -> None:
    """The library's notes (resumed runs, skipped snapshots) go to stderr, one line each."""
    logger = logging.getLogger("debias")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def user_errors(fn: Callable) -> Callable:
    """Decorate a command so that user errors are one line and exit code 2
    (:func:`~debias.errors.one_line_errors`, as the stage scripts)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_line_errors():
            return fn(*args, **kwargs)

    return wrapper


def load_params(params: Path | None, sets: list[str] | None, pipeline: bool = False):
    """The validated :class:`~debias.config.Config` of ``params`` (default ./params.yaml, or the built-in
    defaults when it does not exist) with ``sets`` applied (``pipeline``: checked for every stage of the pipeline)."""
    from debias.config import config_from_dict, load_config

    if params is None and not PARAMS.exists():
        return config_from_dict({}, sets or [], pipeline)
    return load_config(params or PARAMS, sets or [], pipeline)


def with_flags(section: Any, **flags: Any) -> Any:
    """A params section with the given command-line flags (those not None) replacing its fields,
    validated like the section itself (a command passes sections to its job, never a rebuilt Config: the
    checks between sections are the params file's, and a flag is what the user asked for this command)."""
    given = {key: value for key, value in flags.items() if value is not None}
    return dataclasses.replace(section, **given) if given else section


def command_line() -> list[str]:
    """This command as torchrun relaunches it on every GPU (:func:`debias.runtime.on_devices`)."""
    return ["-m", "debias", *sys.argv[1:]]


def echo_main(ranks, text: str) -> None:
    """Print ``text`` on rank 0 only."""
    if ranks.main:
        typer.echo(text)


def main() -> None:
    """The `debias` entry point (``python -m debias``, and what torchrun launches)."""
    app(prog_name="debias")
