"""Stage `train` of dvc.yaml: :func:`debias.jobs.train.train_stage`."""

from debias.jobs.train import train_stage
from debias.pipeline import run_stage

if __name__ == "__main__":
    run_stage(train_stage)
