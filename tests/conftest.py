"""Shared fixtures: golden tensors from the original implementation (see tests/fixtures/README.md) and the micro
pipeline project (tests/micro_project.py), one per test module that uses it."""

from pathlib import Path

import pytest
import torch

from micro_project import make_project

FIXTURES = Path(__file__).parent / "fixtures"
# the modules that take longest (each builds and reuses a micro pipeline project): started first, so that the two
# workers of `pytest -n 2 --dist loadfile` (pyproject.toml) finish together
SLOWEST_FIRST = ("test_experiments.py", "test_pipeline.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in SLOWEST_FIRST)  # stable: each module keeps its order


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / name, weights_only=True)


@pytest.fixture(scope="session", params=["diffusion_linear_1000_respaced50.pt", "diffusion_cosine_1000.pt"])
def golden(request) -> dict:
    """One of the two diffusion golden files (linear with a respaced chain, cosine)."""
    return load_fixture(request.param)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A reproduced micro project of this test module's own (its tests change it in order)."""
    return make_project(tmp_path_factory.mktemp("project"))
