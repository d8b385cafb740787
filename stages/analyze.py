"""Stage `analyze` of dvc.yaml: :func:`debias.jobs.analyze.analyze_stage`."""

from debias.jobs.analyze import analyze_stage
from debias.pipeline import run_stage

if __name__ == "__main__":
    run_stage(analyze_stage)
