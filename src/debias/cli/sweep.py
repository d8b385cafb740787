"""`debias sweep`: queue a grid of DVC experiments, each named by its recipe."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from debias.cli.app import PARAMS, app, user_errors
from debias.errors import DebiasError

RECIPE_KEYS = ("weighting", "target")  # what every experiment's name starts with
NOT_IN_A_NAME = re.compile(r"[^\w.=,+-]")  # characters a git ref (an experiment's name) cannot hold, or reads badly


def experiment_name(overrides: list[str]) -> str:
    """``<weighting>-<target>`` of the experiment, then each other override as given, e.g.
    ``constant-eps-train.steps=3000``: the name of the recipe's training state, less its digest, plus what
    else the experiment changes."""
    cfg = experiment_config(overrides)
    others = [o for o in overrides if o.split("=", 1)[0] not in RECIPE_KEYS]
    return NOT_IN_A_NAME.sub("_", "-".join([cfg.weighting, cfg.target, *others]))


def experiment_config(overrides: list[str]):
    """The validated params of the experiment `dvc exp run -S <overrides>` queues: params.yaml with the
    overrides applied by DVC itself, on a copy."""
    import shutil
    import tempfile

    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    from debias.config import load_config

    with tempfile.TemporaryDirectory() as folder:
        params = Path(folder) / PARAMS.name
        shutil.copyfile(PARAMS, params)
        try:
            apply_overrides(params, overrides)
        except InvalidArgumentError as err:
            raise DebiasError(f"-S {' '.join(overrides)}: {err.__cause__ or err}") from None
        return load_config(params, pipeline=True)


def expand_grid(sets: list[str]) -> list[list[str]]:
    """The experiments of ``-S`` values with DVC's own grammar (``key=a,b``, ``key=range(1,4)``, quoted
    lists): one list of ``key=value`` overrides per combination, in the order `dvc exp run --queue` queues them."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    by_file = to_path_overrides(sets)
    if set(by_file) != {str(PARAMS)}:
        raise DebiasError(f"debias sweep sets params of {PARAMS} only, not of {', '.join(sorted(set(by_file) - {str(PARAMS)}))}")
    try:
        return [combination[str(PARAMS)] for combination in get_hydra_sweeps(by_file)]
    except (HydraException, InvalidArgumentError) as err:
        raise DebiasError(f"cannot read the -S values {' '.join(sets)}: {err}") from None


@app.command("sweep")
@user_errors
def sweep_command(set_: list[str] = typer.Option(..., "--set", "-S", help="A param or a grid of values, as `dvc exp run --queue -S`: key=a,b (repeatable; every combination is queued)."),
                  dry_run: bool = typer.Option(False, "--dry-run", help="Print the commands instead of queueing.")) -> None:
    """Queue one DVC experiment per combination of the -S values, named by its recipe.

    `dvc exp run --queue -S weighting=a,b` names its experiments at random; this queues each with
    `-n <weighting>-<target>[-<other key=value>…]` (e.g. constant-eps), the name of its training state less the
    digest. Run the queue with `dvc exp run --run-all -j K` or `dvc queue start -j K` (with
    DEBIAS_GPUS_PER_EXPERIMENT=N each experiment takes N GPUs of its own)."""
    import shlex
    import subprocess
    import sys

    if not PARAMS.is_file():
        raise DebiasError(f"no {PARAMS} here: run debias sweep in the project's root")
    queued = [(experiment_name(overrides), overrides) for overrides in expand_grid(set_)]
    for name, overrides in queued:
        command = ["dvc", "exp", "run", "--queue", "-n", name, *(a for o in overrides for a in ("-S", o))]
        if dry_run:
            typer.echo(shlex.join(command))
            continue
        done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise DebiasError(f"`{shlex.join(command)}` failed: {last}")
        typer.echo(f"queued {name}")
