"""Solvers: one registry, one call signature, one module per solver, imported when it is asked for.

Every solver is a function

    solver(denoiser, x_T, grid, noise, progress, **options) -> samples (B, C, H, W)

- ``denoiser``: a :class:`~debias.solvers.denoiser.Denoiser` — the network with its target, learned
  variance, clipping and labels — which also carries the full training chain (its ``schedule``).
- ``x_T`` (B, C, H, W): the initial noise (the first draw of ``noise``).
- ``grid``: the noise levels it walks through, one network call each but the last
  (:func:`~debias.solvers.grid.make_grid`: the spacing, the end at σ = 0 or not, the table precision).
- ``noise``: a :class:`~debias.solvers.noise.SampleNoise` (per-sample generators); drawn from by ``ddpm``
  and by ``ddim`` with η > 0.
- ``progress(done, total)``: called after every network evaluation, or None.

:data:`SOLVERS` names every solver with the options it takes (their defaults and checks are the
catalogue's, :data:`debias.catalog.SOLVER_OPTIONS`, as is its default grid, :data:`debias.catalog.SOLVER_SPACINGS`)
and the module that implements it: ``debias.solvers.<module>``, imported by :func:`solver_function` only when
the solver runs. So a process that samples with DDIM executes ``ddim.py`` and no other solver, and dvc.yaml makes
``solvers/<name>.py`` a dependency of ``sample@<name>`` alone (``dpmsolver++.py`` is a link to
``dpmsolver.py``: one algorithm in its two forms). :func:`sample` builds the grid and runs a solver by
name. Solvers run under ``torch.inference_mode()``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from debias import catalog
from debias.catalog import MULTISTEP_SOLVERS, SOLVER_OPTIONS, SOLVER_SPACINGS, check_registry, option_problem
from debias.diffusion.schedule import Schedule
from debias.errors import DebiasError
from debias.solvers.denoiser import Denoiser
from debias.solvers.grid import Grid, make_grid
from debias.solvers.noise import SampleNoise


@dataclass(frozen=True)
class Solver:
    """A registered solver: where it lives (``function`` of ``debias.solvers.<module>``, called with the
    ``fixed`` keyword arguments), the options it takes, the code the original ran it with
    (``guided-diffusion``'s GaussianDiffusion, or ``dpm-solver``: DPM_solver.py / UniPC.py), and when it
    draws fresh noise."""

    module: str
    function: str
    options: tuple[str, ...]
    family: str
    stochastic: Callable[[Mapping[str, Any]], bool] = lambda options: False
    fixed: Mapping[str, Any] = field(default_factory=dict)


SOLVERS: dict[str, Solver] = {
    "ddpm": Solver("ddpm", "ddpm", (), "guided-diffusion", stochastic=lambda options: True),
    "ddim": Solver("ddim", "ddim", ("eta",), "guided-diffusion", stochastic=lambda options: options["eta"] > 0),
    "dpmsolver": Solver("dpmsolver", "dpm_solver", ("order", "lower_order_final"), "dpm-solver",
                        fixed={"algorithm": "dpmsolver"}),
    "dpmsolver++": Solver("dpmsolver", "dpm_solver", ("order", "lower_order_final"), "dpm-solver",
                          fixed={"algorithm": "dpmsolver++"}),
    "unipc": Solver("unipc", "unipc", ("order", "variant"), "dpm-solver"),
}
check_registry(SOLVERS, catalog.SOLVERS, "solver")


def get_solver(name: str) -> Solver:
    """The solver registered as ``name``; DebiasError listing the known names otherwise."""
    if name not in SOLVERS:
        raise DebiasError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


def solver_function(name: str) -> Callable[..., Tensor]:
    """The function of solver ``name``, its module imported now (see the module docstring)."""
    solver = get_solver(name)
    fn = getattr(importlib.import_module(f"{__name__}.{solver.module}"), solver.function)
    return lambda *args, **options: fn(*args, **options, **solver.fixed)


def arithmetic_of(name: str, arithmetic: str) -> tuple[str, str]:
    """(grid tables, Denoiser formulas) of solver ``name`` in ``arithmetic``: ``debias`` — float64 tables and
    the accurate conversions; ``upstream`` — the original's arithmetic for each solver: float32 tables in
    DPM_solver.py / UniPC.py, guided-diffusion's conversions for DDPM and DDIM."""
    if arithmetic not in catalog.ARITHMETIC:
        raise DebiasError(f"unknown arithmetic {arithmetic!r}; choose one of {', '.join(catalog.ARITHMETIC)}")
    if arithmetic == "debias":
        return "float64", "debias"
    return ("float32", "debias") if get_solver(name).family == "dpm-solver" else ("float64", "guided-diffusion")


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
    return {key: options.get(key, SOLVER_OPTIONS[key].default) for key in solver.options}


def solver_grid(name: str, schedule: Schedule, steps: int, spacing: str | None = None, *,
                denoise_to_zero: bool = True, tables: str = "float64") -> Grid:
    """The grid solver ``name`` walks for ``steps`` network calls (``spacing`` None: the solver's default,
    :data:`debias.catalog.SOLVER_SPACINGS`)."""
    get_solver(name)
    return make_grid(schedule, steps, spacing or SOLVER_SPACINGS[name], multistep=name in MULTISTEP_SOLVERS,
                     denoise_to_zero=denoise_to_zero, tables=tables)


def sample(name: str, denoiser: Denoiser, x_T: Tensor, steps: int, *, spacing: str | None = None,
           denoise_to_zero: bool = True, tables: str = "float64", noise: SampleNoise | None = None,
           progress: Callable[[int, int], None] | None = None, **options) -> Tensor:
    """Run solver ``name`` from x_T (B, C, H, W) with ``steps`` network calls on the grid of ``spacing``
    (None: the solver's default), ``denoise_to_zero`` and ``tables``; returns samples (B, C, H, W).
    ``noise``: the batch's :class:`~debias.solvers.noise.SampleNoise` (x_T its first draw), which a solver
    that adds fresh noise needs."""
    options = solver_options(name, options)
    if get_solver(name).stochastic(options) and noise is None:
        raise DebiasError(f"{name} adds fresh noise at every step: pass a noise source (SampleNoise)")
    grid = solver_grid(name, denoiser.schedule, steps, spacing, denoise_to_zero=denoise_to_zero, tables=tables)
    return solver_function(name)(denoiser, x_T, grid, noise, progress, **options)
