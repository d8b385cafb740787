"""Stage `train`: train the recipe (resuming from checkpoints/), then export models/.

With train.devices cuda/auto and several visible GPUs, the stage relaunches itself under torchrun
(one process per GPU, DDP); otherwise it trains in this process.
"""

import os
import sys

import torch

from debias.config import Config
from debias.pipeline import CHECKPOINTS, LOGS, MODEL, SNAPSHOTS, load_prepared, run_stage
from debias.training import export_model, train


def gpus_to_use(cfg: Config) -> int:
    if cfg.train.devices == "cpu" or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def main(cfg: Config, args: list[str]) -> None:
    gpus = gpus_to_use(cfg)
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        os.execvp(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc-per-node={gpus}", __file__, *args])
    result = train(cfg, CHECKPOINTS, dataset=load_prepared(), log_dir=LOGS)
    if result.is_main_process:
        export_model(CHECKPOINTS, MODEL, SNAPSHOTS)


if __name__ == "__main__":
    run_stage(main)
