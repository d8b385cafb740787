"""Samplers: one registry, one call signature.

Every solver is a function

    solver(denoiser, x_T, grid, noise=None, progress=None, **options) -> samples (B, C, H, W)

- ``denoiser``: a :class:`~debias.samplers.denoiser.Denoiser` — the network with its target, learned
  variance, clipping and labels — which also carries the full training chain (its ``schedule``).
- ``x_T`` (B, C, H, W): the initial noise (the first draw of ``noise``).
- ``grid``: the noise levels it walks through, one network call each but the last
  (:func:`~debias.samplers.grid.make_grid`: the spacing, the end at σ = 0 or not, the table precision).
- ``noise``: a :class:`~debias.samplers.noise.SampleNoise` (per-sample generators); needed by ``ddpm``
  and by ``ddim`` with η > 0.
- ``progress(done, total)``: called after every network evaluation.

:data:`SOLVERS` names every solver with the options it takes and the spacing it uses by default; it
is the one place where options are validated and given their defaults (:func:`solver_options`), and
:func:`sample` is the call that builds the grid and runs a solver by name. Solvers run under
``torch.inference_mode()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from debias import catalog
from debias.catalog import check_registry
from debias.diffusion.schedule import Schedule
from debias.errors import DebiasError
from debias.samplers.ddim import ddim
from debias.samplers.ddpm import ddpm
from debias.samplers.denoiser import Denoiser
from debias.samplers.dpm_solver import dpm_solver
from debias.samplers.grid import Grid, make_grid
from debias.samplers.noise import SampleNoise
from debias.samplers.unipc import VARIANTS, unipc


@dataclass(frozen=True)
class Option:
    """A solver option: its default, and what values it takes (``valid``, described by ``allowed``)."""

    default: Any
    valid: Callable[[Any], bool]
    allowed: str


OPTIONS: dict[str, Option] = {
    "eta": Option(0.0, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "a number >= 0"),
    "order": Option(2, lambda v: v in (1, 2, 3) and not isinstance(v, bool), "1, 2 or 3"),
    "variant": Option("bh2", lambda v: v in VARIANTS, " or ".join(VARIANTS)),
    # DPM-Solver lowers the order of its final steps in runs of fewer steps than this (0: never)
    "lower_order_final": Option(15, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                                "a step count >= 0"),
}


@dataclass(frozen=True)
class Solver:
    """A registered solver: its function, the options it takes, the spacing it uses by default, whether
    it takes diffusers' multistep variant of the discrete spacings, the code the original ran it with
    (``guided-diffusion``'s GaussianDiffusion, or ``dpm-solver``: DPM_solver.py / UniPC.py), and when
    it draws fresh noise."""

    fn: Callable[..., Tensor]
    options: tuple[str, ...]
    spacing: str
    multistep: bool
    family: str
    stochastic: Callable[[Mapping[str, Any]], bool] = lambda options: False


# the default spacings are the measured best of every spacing, by FID on the embedded default at 20 steps and
# by the error against the exact answer on Gaussian data (benchmarks/grid_choice.py; the table is in README.md)
SOLVERS: dict[str, Solver] = {
    "ddpm": Solver(ddpm, (), "time_quadratic", False, "guided-diffusion", stochastic=lambda options: True),
    "ddim": Solver(ddim, ("eta",), "trailing", False, "guided-diffusion",
                   stochastic=lambda options: options["eta"] > 0),
    "dpmsolver": Solver(functools.partial(dpm_solver, algorithm="dpmsolver"), ("order", "lower_order_final"),
                        "linspace", True, "dpm-solver"),
    "dpmsolver++": Solver(functools.partial(dpm_solver, algorithm="dpmsolver++"), ("order", "lower_order_final"),
                          "linspace", True, "dpm-solver"),
    "unipc": Solver(unipc, ("order", "variant"), "linspace", True, "dpm-solver"),
}
check_registry(SOLVERS, catalog.SOLVERS, "solver")

# debias: float64 tables and the accurate conversions; upstream: the original's arithmetic for each solver —
# float32 tables in DPM_solver.py / UniPC.py, guided-diffusion's conversions for DDPM and DDIM
ARITHMETIC = catalog.ARITHMETIC


def arithmetic_of(name: str, arithmetic: str) -> tuple[str, str]:
    """(grid tables, Denoiser formulas) of solver ``name`` in ``arithmetic``."""
    if arithmetic not in ARITHMETIC:
        raise DebiasError(f"unknown arithmetic {arithmetic!r}; choose one of {', '.join(ARITHMETIC)}")
    if arithmetic == "debias":
        return "float64", "debias"
    return ("float32", "debias") if get_solver(name).family == "dpm-solver" else ("float64", "guided-diffusion")


def get_solver(name: str) -> Solver:
    """The solver registered as ``name``; DebiasError listing the known names otherwise."""
    if name not in SOLVERS:
        raise DebiasError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


def option_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not a valid value of option ``key`` (None if it is)."""
    option = OPTIONS[key]
    return None if option.valid(value) else f"must be {option.allowed}, got {value!r}"


def solver_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options solver ``name`` runs with: ``options`` (each one it takes, each valid) over the defaults.
    DebiasError (one line) for an unknown solver, an option it does not take, or a bad value."""
    solver = get_solver(name)
    for key, value in options.items():
        if key not in solver.options:
            raise DebiasError(f"option {key!r} does not apply to solver {name} "
                              f"(it takes: {', '.join(solver.options) or 'no options'})")
        problem = option_problem(key, value)
        if problem is not None:
            raise DebiasError(f"{name} {key} {problem}")
    return {key: options.get(key, OPTIONS[key].default) for key in solver.options}


def solver_grid(name: str, schedule: Schedule, steps: int, spacing: str | None = None, *,
                denoise_to_zero: bool = True, tables: str = "float64") -> Grid:
    """The grid solver ``name`` walks for ``steps`` network calls (``spacing`` None: the solver's default)."""
    solver = get_solver(name)
    return make_grid(schedule, steps, spacing or solver.spacing, multistep=solver.multistep,
                     denoise_to_zero=denoise_to_zero, tables=tables)


def sample(name: str, denoiser: Denoiser, x_T: Tensor, steps: int, *, spacing: str | None = None,
           denoise_to_zero: bool = True, tables: str = "float64", noise: SampleNoise | None = None,
           progress: Callable[[int, int], None] | None = None, **options) -> Tensor:
    """Run solver ``name`` from x_T (B, C, H, W) with ``steps`` network calls on the grid of ``spacing``
    (None: the solver's default), ``denoise_to_zero`` and ``tables``; returns samples (B, C, H, W)."""
    solver = get_solver(name)
    options = solver_options(name, options)
    if solver.stochastic(options) and noise is None:
        raise DebiasError(f"{name} adds fresh noise at every step: pass a noise source (SampleNoise)")
    grid = solver_grid(name, denoiser.schedule, steps, spacing, denoise_to_zero=denoise_to_zero, tables=tables)
    return solver.fn(denoiser, x_T, grid, noise, progress, **options)
