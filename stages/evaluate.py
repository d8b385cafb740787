"""Stage `evaluate@<solver>` of dvc.yaml: :func:`debias.jobs.evaluate.evaluate_stage`."""

from debias.jobs.evaluate import evaluate_stage
from debias.pipeline import run_stage

if __name__ == "__main__":
    run_stage(evaluate_stage)
