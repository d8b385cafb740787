"""The micro project of the pipeline tests: the repository's dvc.yaml, stages, params (at micro sizes) and
sources in a temporary git repository, reproduced once (`dvc repro`), and the helpers that run commands in it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvc/config", ".dvc/plots", ".dvcignore", "stages", ".gitignore"]

MICRO = {
    "data": {"max_images": 48},
    "model": {"channel_mult": [1], "attention_resolutions": [], "num_res_blocks": 1},
    "diffusion": {"steps": 50},
    "train": {"steps": 12, "batch_size": 16, "checkpoint_every": 6, "snapshot_steps": [6, 12], "log_every": 3,
              "warmup_steps": 2},
    # 9 samples: not divisible by two processes, the chunk size or the batch size
    "sample": {"num_samples": 9, "batch_size": 4, "chunk_size": 4, "steps": [2, 4], "solvers": ["ddim", "unipc"]},
    "eval": {"kid_subset_size": 4, "reference_images": 8, "batch_size": 4, "bootstrap": 20},
    "analyze": {"num_images": 8, "timesteps": 3, "color_steps": [2, 3], "color_samples": 4, "fid_samples": 4,
                "fid_steps": 2},
}


def run(args, cwd, check=True):
    """``args`` run in ``cwd``, this venv first on PATH, on one thread (as torchrun and `pytest -n 2` give their
    processes): every file the micro project's commands write is bitwise comparable with any other run's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def dvc(*args, cwd, check=True):
    return run([sys.executable, "-m", "dvc", *args], cwd, check)


def make_project(root: Path) -> Path:
    """The micro project in the empty folder ``root``, committed and reproduced."""
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
