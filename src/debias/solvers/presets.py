"""Sampling presets: named bundles of per-solver settings that replace the sample params.

``upstream`` samples as the paper's code did (``scripts/image_sample.py`` of yuhuUSTC/Debias, which calls
``guided_diffusion/gaussian_diffusion.py``):

- ``ddpm``, ``ddim``: ``p_sample_loop`` / ``ddim_sample_loop`` of guided-diffusion's ``SpacedDiffusion``
  with ``timestep_respacing=N`` (``even``; ``timestep_respacing="ddimN"`` is ``spacing: ddim``),
  ``clip_denoised=True``, η = 0;
- ``dpmsolver`` (its ``dpm_solver_uncond_loop``): ``DPM_Solver(algorithm_type="dpmsolver")``, order 2,
  ``skip_type="time_uniform"``, ``method="multistep"``, ``lower_order_final=True`` — which that code
  applies below 10 steps —, ``denoise_to_zero=False``, no clipping;
- ``unipc`` (its ``UniPC_uncond_loop``): ``UniPC(algorithm_type="data_prediction")`` with variant
  ``bh1``, order 3, ``time_uniform``, multistep, ``lower_order_final=True`` (always), no final
  denoising, no clipping;
- ``dpmsolver++`` (not called by the paper): the ``dpmsolver`` settings with the data-prediction form;
- every solver: the original's arithmetic (``arithmetic: upstream``: its tables, conversions and einsum
  attention), so that with the same thread count DDPM and DDIM samples are bit for bit the original's
  (a random network at 5 DDIM steps amplifies float32 rounding to 1e-4 — the original's own 1- and
  2-thread runs differ that much). The same holds for the CPU's instruction set (``ATEN_CPU_CAPABILITY``,
  ``ONEDNN_MAX_CPU_ISA``): other kernels round the network differently, and DDIM's x̂0 = x_t/α − (σ/α) ε̂
  multiplies that by 1/α ≈ 157 at t = 999 — 2e-5…7e-5 on clipped samples of magnitude 1, where DPM-Solver
  and UniPC move by under 1e-6 of their magnitude of a few hundred (tests/fixtures/README.md).

The original treats every network as an ε-predictor on the linear 1000-step schedule; here the model's
own target and schedule are used (the correct conversion), so the preset repeats the original exactly
for the paper's ε-models and is the sound generalisation for x0-/v-models and other schedules.
"""

from __future__ import annotations

from typing import Any

from debias import catalog
from debias.catalog import PRESET_GRIDS, check_registry
from debias.errors import DebiasError

# the settings beyond the grid (spacing, denoise_to_zero: the catalogue's PRESET_GRIDS, which config.py checks)
_DPM = dict(clip_x0=False, arithmetic="upstream", order=2, lower_order_final=10)
_GUIDED_DIFFUSION = dict(clip_x0=True, arithmetic="upstream")

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "none": {},
    "upstream": {
        "ddpm": _GUIDED_DIFFUSION,
        "ddim": {**_GUIDED_DIFFUSION, "eta": 0.0},
        "dpmsolver": _DPM,
        "dpmsolver++": _DPM,
        "unipc": dict(clip_x0=False, arithmetic="upstream", order=3, variant="bh1"),
    },
}
check_registry(PRESETS, catalog.PRESETS, "preset")
check_registry(PRESET_GRIDS, catalog.PRESETS, "preset grid")


def preset_settings(preset: str, solver: str) -> dict[str, Any]:
    """The settings preset ``preset`` fixes for ``solver``, its grid included (empty for ``none``)."""
    if preset not in PRESETS:
        raise DebiasError(f"unknown sampling preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESET_GRIDS[preset].get(solver, {}), **PRESETS[preset].get(solver, {})}
