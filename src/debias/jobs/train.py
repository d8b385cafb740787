"""Job `train`: train one recipe, resuming from its training state, and export the model.

Each recipe keeps its own training state, ``checkpoints/<weighting>-<target>-<digest>/`` (the digest of
its training params, :func:`debias.train.rundir.run_key`): an experiment with another recipe never
deletes it, so going back to a recipe resumes (or re-exports) it. ``debias prune`` removes old states.
With train.devices cuda/auto and several visible GPUs, the job relaunches itself under torchrun (one
process per GPU, DDP); otherwise it trains in this process. ``debias train`` calls the same loop,
:func:`debias.train.loop.train`, on the dataset its params name.
"""

from __future__ import annotations

from debias.config import Config
from debias.data.prepared import open_prepared
from debias.pipeline import CHECKPOINTS, LOGS, MODEL, PHEMA, PREPARED, SNAPSHOTS
from debias.runtime import relaunch_on_all_gpus
from debias.train.loop import train
from debias.train.rundir import export_model, run_key


def train_stage(cfg: Config, argv: list[str]) -> None:
    """Stage ``train``: the recipe's state in checkpoints/<recipe>/ trained on data/prepared/ (read as a memory
    map by every process), logs/, and models/ — the final weights, the snapshots and, with train.ema: phema,
    the post-hoc EMA profiles (models/phema/, for sample.ema_std)."""
    relaunch_on_all_gpus(cfg.train.devices, argv)
    state = CHECKPOINTS / run_key(cfg)
    result = train(cfg, state, open_prepared(PREPARED), log_dir=LOGS)
    if result.is_main_process:
        export_model(state, MODEL, SNAPSHOTS, PHEMA)
