"""Shared fixtures: golden tensors from the original implementation (see tests/fixtures/README.md)."""

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / name, weights_only=True)


@pytest.fixture(scope="session", params=["diffusion_linear_1000_respaced50.pt", "diffusion_cosine_1000.pt"])
def golden(request) -> dict:
    """One of the two diffusion golden files (linear with a respaced chain, cosine)."""
    return load_fixture(request.param)
