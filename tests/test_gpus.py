"""The share of GPUs an experiment claims (DEBIAS_GPUS_PER_EXPERIMENT): what it asks for, and its one-line errors.
Two experiments claiming at once: tests/test_pipeline.py::test_concurrent_experiments_claim_disjoint_gpus."""

import pytest
import torch

from debias import gpus
from debias.errors import DebiasError


@pytest.fixture
def two_gpus(monkeypatch):
    """Two simulated GPUs (counted as NVML counts them) and a fresh claim per test (none of these locks a GPU)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus.claim_gpus.cache_clear()
    yield
    gpus.claim_gpus.cache_clear()


def test_without_the_variable_or_a_gpu_nothing_is_claimed(two_gpus, monkeypatch):
    monkeypatch.delenv(gpus.GPUS_ENV, raising=False)
    assert gpus.claim_gpus() is None
    monkeypatch.setenv(gpus.GPUS_ENV, "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert gpus.claim_gpus() is None


@pytest.mark.parametrize("value,words", [("two", "'two'"), ("0", "'0'"), ("-1", "'-1'"), ("3", "only 2 GPU(s)")])
def test_a_share_that_cannot_be_had_is_one_line(two_gpus, monkeypatch, value, words):
    monkeypatch.setenv(gpus.GPUS_ENV, value)
    with pytest.raises(DebiasError, match=r"^DEBIAS_GPUS_PER_EXPERIMENT") as err:
        gpus.claim_gpus()
    assert words in str(err.value) and "\n" not in str(err.value)


def test_visible_gpus_are_named_as_cuda_visible_devices_names_them(two_gpus, monkeypatch):
    assert gpus.visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5a,GPU-7b,GPU-9c")  # NVML counts the first two as usable here
    assert gpus.visible_gpus() == ["GPU-5a", "GPU-7b"]
