"""Samplers: one registry, one call signature.

Every solver is a function

    solver(denoiser, x_T, timesteps, noise=None, progress=None, **options) -> x0 samples (B, C, H, W)

- ``denoiser``: a :class:`~debias.samplers.denoiser.Denoiser` — the network with its target, learned
  variance, clipping and labels — which also carries the full training chain (its ``schedule``).
- ``x_T`` (B, C, H, W): the initial noise (the first draw of ``noise``).
- ``timesteps``: the ascending ORIGINAL timesteps the solver evaluates the network at, one call each
  (:func:`~debias.samplers.timesteps.select_timesteps`).
- ``noise``: a :class:`~debias.samplers.noise.SampleNoise` (per-sample generators); needed by ``ddpm``
  and by ``ddim`` with η > 0.
- ``progress(done, total)``: called after every network evaluation.

:data:`SOLVERS` names every solver with the options it takes; it is the one place where options are
validated and given their defaults (:func:`solver_options`), and :func:`sample` is the call that picks
the timesteps by ``spacing`` and runs a solver by name. Solvers run under ``torch.inference_mode()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from debias.errors import DebiasError
from debias.samplers.ddim import ddim
from debias.samplers.ddpm import ddpm
from debias.samplers.denoiser import Denoiser
from debias.samplers.dpm_solver import dpm_solver
from debias.samplers.noise import SampleNoise
from debias.samplers.timesteps import select_timesteps
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
}


@dataclass(frozen=True)
class Solver:
    """A registered solver: its function, the options it takes, whether it visits diffusers'
    multistep timesteps (its last step lands on σ = 0), and when it draws fresh noise."""

    fn: Callable[..., Tensor]
    options: tuple[str, ...]
    multistep: bool
    stochastic: Callable[[Mapping[str, Any]], bool] = lambda options: False


SOLVERS: dict[str, Solver] = {
    "ddpm": Solver(ddpm, (), multistep=False, stochastic=lambda options: True),
    "ddim": Solver(ddim, ("eta",), multistep=False, stochastic=lambda options: options["eta"] > 0),
    "dpmsolver": Solver(functools.partial(dpm_solver, algorithm="dpmsolver"), ("order",), multistep=True),
    "dpmsolver++": Solver(functools.partial(dpm_solver, algorithm="dpmsolver++"), ("order",), multistep=True),
    "unipc": Solver(unipc, ("order", "variant"), multistep=True),
}


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


def sample(name: str, denoiser: Denoiser, x_T: Tensor, steps: int, *, spacing: str = "even",
           noise: SampleNoise | None = None, progress: Callable[[int, int], None] | None = None,
           **options) -> Tensor:
    """Run solver ``name`` from x_T (B, C, H, W) with ``steps`` network calls at the timesteps that
    ``spacing`` selects; returns x0 samples (B, C, H, W)."""
    solver = get_solver(name)
    options = solver_options(name, options)
    if solver.stochastic(options) and noise is None:
        raise DebiasError(f"{name} adds fresh noise at every step: pass a noise source (SampleNoise)")
    timesteps = select_timesteps(denoiser.schedule.num_timesteps, steps, spacing, multistep=solver.multistep)
    return solver.fn(denoiser, x_T, timesteps, noise, progress, **options)
