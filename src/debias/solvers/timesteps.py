"""The discrete spacings: which original (integer) timesteps of the chain a sampler visits.

Spacings:
- ``even``: guided-diffusion's ``space_timesteps(T, str(steps))`` — evenly strided, both ends kept.
- ``ddim``: guided-diffusion's ``space_timesteps(T, f"ddim{steps}")`` — ``range(0, T, stride)`` with the
  integer stride that gives exactly ``steps`` points (the DDIM paper's respacing, ``timestep_respacing="ddimN"``).
- ``linspace``, ``leading``, ``trailing``: diffusers' ``timestep_spacing`` options (Lin et al. 2023,
  Table 2) with ``steps_offset=0``. diffusers has two variants of the first two formulas:
  ``DDIMScheduler``/``DDPMScheduler`` place ``steps`` points, while the multistep solvers
  (``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``) place ``steps + 1`` points and
  drop the smallest, because their last step lands on σ = 0 anyway. ``multistep=True`` selects
  the latter; ``trailing`` and ``even`` are the same for both.
"""

from __future__ import annotations

import numpy as np

from debias.catalog import DISCRETE_SPACINGS
from debias.diffusion.schedule import space_timesteps
from debias.errors import DebiasError


def select_timesteps(num_timesteps: int, steps: int, spacing: str = "even", *, multistep: bool = False) -> list[int]:
    """The ascending original timesteps (``steps`` distinct values in [0, T-1]) a sampler visits.

    Raises DebiasError for an unknown spacing, ``steps`` outside [1, T], or a spacing that would
    repeat a timestep at this step count.
    """
    if spacing not in DISCRETE_SPACINGS:
        raise DebiasError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(DISCRETE_SPACINGS)}")
    if not 1 <= steps <= num_timesteps:
        raise DebiasError(f"cannot sample with {steps} steps: the model's diffusion chain has "
                         f"{num_timesteps} steps (choose 1..{num_timesteps})")
    T, n = num_timesteps, steps
    if spacing == "even":
        return space_timesteps(T, str(n))
    if spacing == "ddim":
        try:
            return space_timesteps(T, f"ddim{n}")
        except ValueError:
            raise DebiasError(f"'ddim' spacing has no integer stride giving exactly {n} of {T} steps; "
                              "use another step count or spacing") from None
    if spacing == "trailing":
        # diffusers: np.round(np.arange(T, 0, -T / n)) - 1, written so that float rounding of the
        # arange length can never add an (n+1)-th point
        kept = np.round(T - np.arange(n) * (T / n)).astype(np.int64) - 1
    elif spacing == "linspace":
        kept = np.linspace(0, T - 1, n + 1)[1:] if multistep else np.linspace(0, T - 1, n)
        kept = kept.round().astype(np.int64)
    else:  # leading
        kept = np.arange(1, n + 1) * (T // (n + 1)) if multistep else np.arange(n) * (T // n)
    kept = sorted(int(k) for k in kept)
    if len(set(kept)) != n:
        raise DebiasError(f"{spacing!r} spacing repeats timesteps for {n} steps of a {T}-step chain; "
                         "use fewer steps or another spacing")
    return kept
