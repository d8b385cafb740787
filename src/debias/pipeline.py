"""What the DVC stages share: the artefact paths of dvc.yaml and the stage runner.

Stage scripts in ``stages/`` are thin: read params.yaml, call the library, write exactly the outs
that dvc.yaml declares (under these paths, relative to the repository root).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from debias.config import Config, load_config
from debias.data import ImageDataset
from debias.errors import DebiasError
from debias.images import from_uint8, to_uint8
from debias.io import atomic_write

PARAMS = Path("params.yaml")
PREPARED = Path("data/prepared.npz")
REFERENCE_FEATURES = Path("data/reference_features.npz")
CHECKPOINTS = Path("checkpoints")
MODEL = Path("models/model.pt")
SNAPSHOTS = Path("models/snapshots")
LOGS = Path("logs")
SAMPLES = Path("samples")
METRICS = Path("metrics")
PLOTS = Path("plots")
FIGURES = Path("plots/figures")
REPORTS = Path("reports")


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


def run_stage(main: Callable[[Config, list[str]], None]) -> None:
    """Run a stage on params.yaml; a :class:`DebiasError` becomes one line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(load_config(PARAMS), sys.argv[1:])
    except DebiasError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
