"""What the DVC stages share: the artefact paths of dvc.yaml and the stage runner.

Stage scripts in ``stages/`` are thin: read params.yaml, call the library, write exactly the outs
that dvc.yaml declares (under these paths, relative to the repository root).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from debias.config import Config, load_config
from debias.data import ImageDataset
from debias.errors import DebiasError, reports_errors, user_message
from debias.images import from_uint8, to_uint8
from debias.io import atomic_write
from debias.runtime import Ranks, processes, relaunch_on_all_gpus

PARAMS = Path("params.yaml")
PREPARED = Path("data/prepared.npz")
REFERENCE_FEATURES = Path("data/reference_features.npz")
CHECKPOINTS = Path("checkpoints")
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


def metrics_file(solver: str) -> Path:
    """``evaluate@<solver>``'s DVC metrics: ``{solver: {fid, sfid, kid, precision, recall}}`` at the first
    of sample.steps (nested under the solver so that `dvc exp show` names the columns ``ddim.fid``, …)."""
    return METRICS / f"{solver}.json"


def steps_table(solver: str) -> Path:
    """``evaluate@<solver>``'s table: every metric at every step count of sample.steps."""
    return METRICS / f"{solver}_vs_steps.tsv"


def provenance_file(solver: str) -> Path:
    """``evaluate@<solver>``'s provenance: extractor, weights, versions, set sizes, seconds."""
    return METRICS / f"{solver}.provenance.json"


def samples_file(solver: str, steps: int) -> Path:
    """Where ``sample@<solver>`` writes the uint8 samples for one step count."""
    return SAMPLES / solver / f"steps_{steps}.npz"


def save_prepared(path: Path, dataset: ImageDataset) -> None:
    """The prepared training set: uint8 images (N, C, H, W) and labels (N,) (empty when unlabelled)."""
    labels = dataset.labels.numpy() if dataset.labels is not None else np.zeros(0, dtype=np.int64)
    atomic_write(path, lambda f: np.savez(f, images=to_uint8(dataset.images).numpy(), labels=labels,
                                          num_classes=np.int64(dataset.num_classes or 0)))


def load_prepared(path: Path = PREPARED) -> ImageDataset:
    """The training set written by the ``prepare`` stage, as floats in [-1, 1]."""
    if not path.is_file():
        raise DebiasError(f"{path} not found; run `dvc repro prepare` first")
    with np.load(path) as data:
        images = from_uint8(data["images"])
        labels = torch.from_numpy(data["labels"]) if data["labels"].size else None
        num_classes = int(data["num_classes"]) or None
    return ImageDataset(images=images, labels=labels, num_classes=num_classes)


def chunks_dir(solver: str, steps: int) -> Path:
    """The chunk folder of ``sample@<solver>`` at one step count (a persistent out: runs resume from it)."""
    return CHUNKS / solver / f"steps_{steps}"


@contextlib.contextmanager
def on_devices(devices: str, script: str, args: list[str]) -> Iterator[tuple[Ranks, torch.device]]:
    """Run a stage on ``devices``: with several visible GPUs (cuda/auto) relaunch ``script args`` under
    torchrun, one process per GPU; then join the process group and yield (ranks, this rank's device)."""
    relaunch_on_all_gpus(devices, [script, *args])
    with processes(devices) as (ranks, device):
        yield ranks, device


def run_stage(main: Callable[[Config, list[str]], None]) -> None:
    """Run a stage on params.yaml; a user error (:func:`~debias.errors.user_message`) becomes one line
    (from rank 0 under torchrun) and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(load_config(PARAMS), sys.argv[1:])
    except (DebiasError, OSError, MemoryError, RuntimeError) as err:
        message = user_message(err)
        if message is None:
            raise
        if reports_errors():
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
