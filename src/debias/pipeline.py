"""The DVC pipeline's side of the library: the artefact paths of dvc.yaml and the stage runner.

The scripts in ``stages/`` are shims: ``run_stage(job)`` reads params.yaml and calls one function of
:mod:`debias.jobs` with the stage's arguments; the job reads and writes exactly the paths below
(relative to the repository root), which are the deps and outs dvc.yaml declares — except the training
states, :func:`training_states`, which every workspace of the project shares and DVC does not track.
This module imports no implementation, so a stage's import closure — its dvc.yaml deps — is what its job runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from debias.config import Config, load_config
from debias.errors import one_line_errors

PARAMS = Path("params.yaml")
PREPARED = Path("data/prepared")  # a prepared set: images.npy (a memory map), labels.npy, meta.json
REFERENCE_FEATURES = Path("data/reference_features.npz")
CHECKPOINTS = Path("checkpoints")  # the training states' folder in the main workspace, unless DEBIAS_STATES
STATES_ENV = "DEBIAS_STATES"
CHUNKS = Path("chunks")
MODEL = Path("models/model.pt")
SNAPSHOTS = Path("models/snapshots")
PHEMA = Path("models/phema")
LOGS = Path("logs")
SAMPLES = Path("samples")
METRICS = Path("metrics")
PLOTS = Path("plots")
FIGURES = Path("plots/figures")
REPORTS = Path("reports")


def training_states() -> Path:
    """The folder of the training states, ``<recipe>/`` each: ``$DEBIAS_STATES`` if set (a relative path is
    taken from the project's root), else ``checkpoints/`` of the project's main workspace.

    DVC runs a ``--temp`` or queued experiment in a fresh git repository under ``.dvc/tmp/exps/`` and sets
    ``DVC_ROOT`` to the main workspace for its stages (to the workspace itself under ``dvc repro`` and
    ``dvc exp run``), so every run of a recipe finds the same folder, wherever it runs; outside DVC the
    root is the current folder."""
    root = Path(os.environ.get("DVC_ROOT") or ".")
    return root / Path(os.environ.get(STATES_ENV) or CHECKPOINTS).expanduser()


def metrics_file(solver: str) -> Path:
    """``evaluate@<solver>``'s DVC metrics: ``{solver: {fid, sfid, kid, precision, recall}}`` at the first
    of sample.steps (nested under the solver so that `dvc exp show` names the columns ``ddim.fid``, …)."""
    return METRICS / f"{solver}.json"


def steps_table(solver: str) -> Path:
    """``evaluate@<solver>``'s table: every metric at every step count of sample.steps."""
    return METRICS / f"{solver}_vs_steps.tsv"


def intervals_file(solver: str) -> Path:
    """``evaluate@<solver>``'s intervals: {steps: {fid, sfid: bootstrap interval; kid: standard error; fid_infinity}},
    :func:`debias.metrics.intervals.score_intervals` per step count of sample.steps."""
    return METRICS / f"{solver}.intervals.json"


def provenance_file(solver: str) -> Path:
    """``evaluate@<solver>``'s provenance: extractor, weights, versions, set sizes, seconds."""
    return METRICS / f"{solver}.provenance.json"


def samples_file(solver: str, steps: int) -> Path:
    """Where ``sample@<solver>`` writes the uint8 samples for one step count."""
    return SAMPLES / solver / f"steps_{steps}.npz"


def chunks_dir(solver: str, steps: int) -> Path:
    """The chunk folder of ``sample@<solver>`` at one step count (a persistent out: runs resume from it)."""
    return CHUNKS / solver / f"steps_{steps}"


def run_stage(job: Callable[[Config, list[str]], None]) -> None:
    """Run a stage's job on params.yaml with this process's command line (``stages/<stage>.py ARGS``, which
    a job relaunches under torchrun on several GPUs); a user error is one line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors():
        job(load_config(PARAMS, pipeline=True), list(sys.argv))
