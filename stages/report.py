"""Stage `report` of dvc.yaml: :func:`debias.jobs.report.report_stage`."""

from debias.jobs.report import report_stage
from debias.pipeline import run_stage

if __name__ == "__main__":
    run_stage(report_stage)
