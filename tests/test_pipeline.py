"""The real pipeline: `dvc repro` and `dvc exp run -S weighting=...` on a micro configuration in a
temporary git repository (seconds of training, a handful of samples)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", "stages", ".gitignore"]

MICRO = {
    "data": {"max_images": 48},
    "model": {"channel_mult": [1], "attention_resolutions": [], "num_res_blocks": 1},
    "diffusion": {"steps": 50},
    "train": {"steps": 12, "batch_size": 16, "checkpoint_every": 6, "snapshot_steps": [6, 12], "log_every": 3,
              "warmup_steps": 2},
    "sample": {"num_samples": 8, "batch_size": 8, "steps": [2, 4], "solvers": ["ddim", "unipc"]},
    "eval": {"kid_subset_size": 4, "reference_images": 8},
    "analyze": {"num_images": 8, "timesteps": 3, "color_steps": [2, 3], "color_samples": 4, "fid_samples": 4,
                "fid_steps": 2},
}

pytestmark = pytest.mark.slow


def run(args, cwd, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def dvc(*args, cwd, check=True):
    return run([sys.executable, "-m", "dvc", *args], cwd, check)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    # the stages depend on the library sources: give the copy its own (identical) tree
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in MICRO.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "micro project"], root)
    dvc("repro", cwd=root)
    return root


def test_repro_produces_every_declared_output(project):
    for solver in ("ddim", "unipc"):
        metrics = json.loads((project / "metrics" / f"{solver}.json").read_text())
        assert metrics["fid"] > 0 and set(metrics["by_steps"]) == {"2", "4"}
        assert metrics["provenance"]["extractor"] == "inception-v3-compat"
        assert len(metrics["provenance"]["weights_sha256"]) == 64
        assert (project / "samples" / solver / "steps_4.npz").is_file()
        assert (project / "reports" / f"grid_{solver}.png").is_file()
    for name in ("x0_bias.tsv", "color_shift.tsv", "fid_vs_train.tsv", "figures/x0_bias.png", "figures/color_grid.png"):
        assert (project / "plots" / name).is_file(), name
    assert (project / "models" / "model.pt").is_file()
    assert sorted(p.name for p in (project / "models" / "snapshots").iterdir()) == ["step_0000006.pt", "step_0000012.pt"]
    report = (project / "reports" / "report.md").read_text()
    assert "| ddim | 2 |" in report and "debias" in report
    shown = dvc("metrics", "show", "--json", cwd=project).stdout
    assert "metrics/unipc.json" in shown


def test_second_repro_is_a_no_op_and_steps_change_reruns_only_downstream(project):
    out = dvc("repro", cwd=project).stdout
    assert "Running stage" not in out
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sample"]["steps"] = [2, 3]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = dvc("repro", "--dry", cwd=project).stdout
    would_run = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
    assert would_run == {"sample@ddim", "sample@unipc", "evaluate@ddim", "evaluate@unipc", "report"}
    params["sample"]["steps"] = [2, 4]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_experiment_with_another_weighting(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline run"], project)
    dvc("exp", "run", "-S", "weighting=p2", "-n", "p2-run", cwd=project)
    table = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    from debias.report import experiments_from_exp_show

    experiments = {e["name"]: e for e in experiments_from_exp_show(table)}
    assert "p2-run" in experiments
    assert experiments["p2-run"]["params"]["weighting"] == "p2"
    assert experiments["p2-run"]["metrics"]["metrics/ddim.json"]["fid"] > 0
