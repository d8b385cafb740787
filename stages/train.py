"""Stage `train`: train the recipe (resuming from checkpoints/), then export models/.

With train.devices cuda/auto and several visible GPUs, the stage relaunches itself under torchrun
(one process per GPU, DDP); otherwise it trains in this process.
"""

from debias.config import Config
from debias.pipeline import CHECKPOINTS, LOGS, MODEL, SNAPSHOTS, load_prepared, run_stage
from debias.runtime import relaunch_on_all_gpus
from debias.train.loop import train
from debias.train.rundir import export_model


def main(cfg: Config, args: list[str]) -> None:
    relaunch_on_all_gpus(cfg.train.devices, [__file__, *args])
    result = train(cfg, CHECKPOINTS, dataset=load_prepared(), log_dir=LOGS)
    if result.is_main_process:
        export_model(CHECKPOINTS, MODEL, SNAPSHOTS)


if __name__ == "__main__":
    run_stage(main)
