"""Job `train`: train one recipe, resuming from its training state, and export the model.

Each recipe keeps its own training state, ``<weighting>-<target>-<digest>/`` (the digest of its training
params, :func:`debias.train.rundir.run_key`) in the folder every workspace of the project shares,
:func:`debias.pipeline.training_states`: an experiment with another recipe never deletes it, so the next
run of a recipe — in the workspace, a ``--temp`` copy or a queue worker — resumes (or re-exports) it.
``debias prune`` removes old states. Two runs of one recipe take turns (the second waits for the first).
With train.devices cuda/auto and several visible GPUs, the job relaunches itself under torchrun (one
process per GPU, DDP); otherwise it trains in this process. ``debias train`` calls the same loop,
:func:`debias.train.loop.train`, on the dataset its params name.
"""

from __future__ import annotations

from debias.config import Config
from debias.data.prepared import open_prepared
from debias.pipeline import LOGS, MODEL, PHEMA, PREPARED, SNAPSHOTS, training_states
from debias.runtime import relaunch_on_all_gpus
from debias.train.loop import train
from debias.train.rundir import RunDir, export_model, run_key


def train_stage(cfg: Config, argv: list[str]) -> None:
    """Stage ``train``: the recipe's state in <training states>/<recipe>/ trained on data/prepared/ (read as a
    memory map by every process), logs/, and models/ — the final weights, the snapshots and, with train.ema:
    phema, the post-hoc EMA profiles (models/phema/, for sample.ema_std). The state stays locked from before
    the GPUs are claimed until the export is written."""
    state = RunDir(training_states() / run_key(cfg), LOGS)
    with state.held_for_job():
        relaunch_on_all_gpus(cfg.train.devices, argv)
        result = train(cfg, state.out_dir, open_prepared(PREPARED), log_dir=LOGS)
        if result.is_main_process:
            export_model(state.out_dir, MODEL, SNAPSHOTS, PHEMA)
