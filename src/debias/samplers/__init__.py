"""Samplers: one registry, one call signature.

Every sampler is called as

    fn(model, x_T, steps, schedule, target, learn_sigma, clip_x0=True, y=None, noise=None, progress=None,
       *, spacing="even", **options) -> x0 samples (B, C, H, W)

- ``model(x, t, y)``: x (B, C, H, W), t (B,) int64 ORIGINAL timesteps, y (B,) labels or None → output
  (B, C or 2C, H, W) predicting ``target`` (eps / x0 / v); ``learn_sigma`` says it has 2C channels.
- ``x_T`` (B, C, H, W): the initial noise (the first draw of ``noise``).
- ``schedule``: the full training chain (:class:`~debias.diffusion.schedule.Schedule`), any betas.
- ``noise``: a :class:`~debias.samplers.noise.SampleNoise` (per-sample generators); needed by ``ddpm``
  and by ``ddim`` with η > 0.
- ``progress(done, total)``: called after every model evaluation.
- ``spacing``: timestep selection (:mod:`debias.samplers.timesteps`).

Options: ``ddim`` — ``eta``; ``dpmsolver``/``dpmsolver++`` — ``order`` (1–3); ``unipc`` — ``order``
(1–3) and ``variant`` (``bh1``/``bh2``). Each sampler makes exactly ``steps`` model calls and runs
under ``torch.inference_mode()``.
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import Tensor

from debias.samplers.ddim import ddim
from debias.samplers.ddpm import ddpm
from debias.samplers.dpm_solver import dpm_solver
from debias.samplers.noise import SampleNoise, sample_labels
from debias.samplers.timesteps import SPACINGS, select_timesteps
from debias.samplers.unipc import VARIANTS, unipc

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpmsolver": functools.partial(dpm_solver, algorithm="dpmsolver"),
    "dpmsolver++": functools.partial(dpm_solver, algorithm="dpmsolver++"),
    "unipc": unipc,
}

# samplers whose last step lands on σ = 0 and that use diffusers' multistep timestep spacings
MULTISTEP = ("dpmsolver", "dpmsolver++", "unipc")

# which keyword options each sampler accepts (besides ``spacing``)
OPTIONS: dict[str, tuple[str, ...]] = {
    "ddpm": (), "ddim": ("eta",), "dpmsolver": ("order",), "dpmsolver++": ("order",), "unipc": ("order", "variant"),
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler registered as ``name``; ValueError listing the known names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_options(name: str, options: dict) -> None:
    """ValueError (one line) unless ``options`` are valid keyword options for sampler ``name``."""
    get_sampler(name)
    for key, value in options.items():
        if key not in OPTIONS[name]:
            raise ValueError(f"option {key!r} does not apply to solver {name} "
                             f"(it takes: {', '.join(OPTIONS[name]) or 'no options'})")
        if key == "order" and value not in (1, 2, 3):
            raise ValueError(f"{name} order must be 1, 2 or 3, got {value}")
        if key == "variant" and value not in VARIANTS:
            raise ValueError(f"unknown UniPC variant {value!r}; choose one of {', '.join(VARIANTS)}")
        if key == "eta" and not value >= 0:
            raise ValueError(f"DDIM eta must be >= 0, got {value}")


def sample(name: str, /, *args, **kwargs) -> Tensor:
    """Run sampler ``name`` with the common signature (see the module docstring)."""
    return get_sampler(name)(*args, **kwargs)


__all__ = ["SAMPLERS", "MULTISTEP", "OPTIONS", "SPACINGS", "SampleNoise", "check_options", "get_sampler", "sample",
           "sample_labels", "select_timesteps", "ddpm", "ddim", "dpm_solver", "unipc"]
