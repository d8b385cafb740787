"""Shared fixtures: golden tensors from the original implementation (see tests/fixtures/README.md) and the micro
pipeline project (tests/micro_project.py), reproduced once per run and copied for each test module that uses it."""

import fcntl
import os
import shutil
from pathlib import Path

# `pytest -n 2` (pyproject.toml) runs two workers on two cores: one thread each, for them and the commands they
# start, since torch's threads spinning against the other worker's slow small-tensor tests down tenfold
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

import pytest  # noqa: E402
import torch  # noqa: E402

from micro_project import make_project  # noqa: E402

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
# the modules that take longest, longest first (measured with `pytest --durations=0`): `pytest -n 2 --dist loadfile
# --no-loadscope-reorder` (pyproject.toml) hands whole modules to the two workers in this order, so that they finish
# together; test_experiments.py builds the micro project while the other worker runs modules that do not need it
SLOWEST_FIRST = ("test_experiments.py", "test_speed_options.py", "test_hostile.py", "test_training.py",
                 "test_upstream.py", "test_pipeline.py", "test_metrics.py", "test_reliability.py", "test_scale.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / name, weights_only=True)


@pytest.fixture(scope="session", params=["diffusion_linear_1000_respaced50.pt", "diffusion_cosine_1000.pt"])
def golden(request) -> dict:
    """One of the two diffusion golden files (linear with a respaced chain, cosine)."""
    return load_fixture(request.param)


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> Path:
    """The micro project reproduced once per test run: by the first worker that asks (`pytest -n 2`), the other
    waiting for it. Never changed: each module works on its own copy."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if "PYTEST_XDIST_WORKER" in os.environ else root  # the workers' shared folder
    template, done = root / "micro_project", root / "micro_project.done"
    with open(root / "micro_project.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(template, ignore_errors=True)
            template.mkdir()
            make_project(template)
            done.touch()
    return template


@pytest.fixture(scope="module")
def project(built_project, tmp_path_factory) -> Path:
    """A reproduced micro project of this test module's own (its tests change it in order)."""
    copy = tmp_path_factory.mktemp("project")
    shutil.copytree(built_project, copy, symlinks=True, dirs_exist_ok=True)
    return copy
