"""debias.limits: the arithmetic config.py checks at load time refuses exactly what the code refuses later."""

import itertools

import pytest
import torch

from debias.catalog import DISCRETE_SPACINGS
from debias.config import ModelConfig
from debias.errors import DebiasError
from debias.limits import timesteps_problem, training_notes, unet_problem
from debias.models.unet import UNetModel
from debias.solvers.timesteps import select_timesteps


@pytest.mark.parametrize("spacing", DISCRETE_SPACINGS)
@pytest.mark.parametrize("multistep", [False, True])
def test_timesteps_problem_is_what_select_timesteps_refuses(spacing, multistep):
    for T in [*range(2, 70), 97, 100, 128, 250, 1000]:
        for steps in sorted({*range(0, min(T, 60) + 3), T - 2, T - 1, T, T + 1}):
            problem = timesteps_problem(T, steps, spacing, multistep)
            try:
                kept = select_timesteps(T, steps, spacing, multistep=multistep)
            except DebiasError as err:
                assert problem == str(err), (T, steps)
            else:
                assert problem is None, (T, steps)
                assert len(set(kept)) == steps and 0 <= min(kept) and max(kept) < T, (T, steps)


def test_continuous_spacings_place_any_number_of_steps():
    assert timesteps_problem(20, 500, "time_uniform", True) is None


UNETS = itertools.product([8, 12, 16, 24, 32], [[1], [1, 2], [1, 2, 2], [1, 1, 2, 2]], [[], [4], [8], [3], [16, 4]],
                          [32, 64], [8, 16, 24, 48, 64, 128])


def test_unet_problem_is_what_the_unet_refuses():
    for image_size, mult, attention, channels, heads in UNETS:
        problem = unet_problem(image_size, channels, mult, attention, heads)
        levels = [image_size // 2**level for level in range(len(mult))]
        try:
            if image_size % 2 ** (len(mult) - 1) or not set(attention) <= set(levels):
                raise ValueError("layout")  # what the UNet cannot be given: its rates are image_size // res
            with torch.device("meta"):
                UNetModel(image_size, 3, channels, 6, 1, tuple(image_size // r for r in attention), channel_mult=mult,
                          num_head_channels=heads)
        except ValueError:
            assert problem is not None, (image_size, mult, attention, channels, heads)
        else:
            assert problem is None, (image_size, mult, attention, channels, heads, problem)


def test_unet_kwargs_refuses_with_the_params_words():
    from debias.models.factory import unet_kwargs

    with pytest.raises(ValueError, match=r"^model.num_head_channels: 64 channels do not split into heads of 24$"):
        unet_kwargs(ModelConfig(num_head_channels=24), image_size=8, channels=1, num_classes=None)


def test_training_notes():
    assert training_notes(60, 100, [500]) == [
        "note: train.snapshot_steps 500 lie beyond train.steps=60; no snapshot is kept there",
        "note: train.warmup_steps=100 is above train.steps=60: the learning rate rises to 60% of train.lr and never "
        "reaches it"]
    assert training_notes(100, 100, [50, 100]) == []
