"""Stage `prepare` of dvc.yaml: :func:`debias.jobs.prepare.prepare_stage`."""

from debias.jobs.prepare import prepare_stage
from debias.pipeline import run_stage

if __name__ == "__main__":
    run_stage(prepare_stage)
