"""Stage `sample@<solver>` of dvc.yaml: :func:`debias.jobs.sample.sample_stage`."""

from debias.jobs.sample import sample_stage
from debias.pipeline import run_stage

if __name__ == "__main__":
    run_stage(sample_stage)
