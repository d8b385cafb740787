"""Stage `train`: train the recipe (resuming from its state in checkpoints/<recipe>/), then export models/.

Each recipe keeps its own training state, ``checkpoints/<weighting>-<target>-<digest>/`` (the digest of
its training params, :func:`debias.train.rundir.run_key`): an experiment with another recipe never
deletes it, so going back to a recipe resumes (or re-exports) it. ``debias prune`` removes old states.
With train.devices cuda/auto and several visible GPUs, the stage relaunches itself under torchrun
(one process per GPU, DDP); otherwise it trains in this process. models/ gets the final weights, the
snapshots and, with train.ema: phema, the post-hoc EMA profiles (models/phema/, for sample.ema_std).
"""

from debias.config import Config
from debias.pipeline import CHECKPOINTS, LOGS, MODEL, PHEMA, SNAPSHOTS, load_prepared, run_stage
from debias.runtime import relaunch_on_all_gpus
from debias.train.loop import train
from debias.train.rundir import export_model, run_key


def main(cfg: Config, args: list[str]) -> None:
    relaunch_on_all_gpus(cfg.train.devices, [__file__, *args])
    state = CHECKPOINTS / run_key(cfg)
    result = train(cfg, state, dataset=load_prepared(), log_dir=LOGS)
    if result.is_main_process:
        export_model(state, MODEL, SNAPSHOTS, PHEMA)


if __name__ == "__main__":
    run_stage(main)
