"""Job `train`: train one recipe, resuming from its training state, and export the model.

Each recipe keeps its own training state, ``checkpoints/<weighting>-<target>-<digest>/`` (the digest of
its training params, :func:`debias.train.rundir.run_key`): an experiment with another recipe never
deletes it, so going back to a recipe resumes (or re-exports) it. ``debias prune`` removes old states.
With train.devices cuda/auto and several visible GPUs, the job relaunches itself under torchrun (one
process per GPU, DDP); otherwise it trains in this process.
"""

from __future__ import annotations

from pathlib import Path

from debias.config import Config
from debias.data import ImageDataset, load_prepared
from debias.pipeline import CHECKPOINTS, LOGS, MODEL, PHEMA, PREPARED, SNAPSHOTS
from debias.runtime import relaunch_on_all_gpus
from debias.train.loop import TrainResult, train
from debias.train.rundir import export_model, run_key


def train_recipe(cfg: Config, state: Path, argv: list[str], *, dataset: ImageDataset | None = None,
                 log_dir: Path | None = None, resume: bool = True, progress: bool = True) -> TrainResult:
    """Train ``cfg`` into the run folder ``state`` (:func:`debias.train.loop.train`) on train.devices, this
    process's command line ``argv`` relaunched under torchrun when there are several GPUs."""
    relaunch_on_all_gpus(cfg.train.devices, argv)
    return train(cfg, state, dataset=dataset, log_dir=log_dir, resume=resume, progress=progress)


def train_stage(cfg: Config, argv: list[str]) -> None:
    """Stage ``train``: the recipe's state in checkpoints/<recipe>/, logs/, and models/ — the final weights,
    the snapshots and, with train.ema: phema, the post-hoc EMA profiles (models/phema/, for sample.ema_std)."""
    state = CHECKPOINTS / run_key(cfg)
    result = train_recipe(cfg, state, argv, dataset=load_prepared(PREPARED), log_dir=LOGS)
    if result.is_main_process:
        export_model(state, MODEL, SNAPSHOTS, PHEMA)
