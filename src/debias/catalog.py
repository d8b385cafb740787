"""The ground floor: the names of every registry family and the defaults that configuration needs —
what params.yaml, ``dvc exp run -S`` and the CLI accept — in one module that imports nothing, so that
the command line offers them as choices without loading torch and :mod:`debias.config` validates a
params file without importing a single implementation.

Each registry binds its implementations to exactly these names and checks it when it is imported
(:func:`check_registry`): weightings and weight spaces (:mod:`debias.diffusion.weighting`), targets
(:mod:`debias.diffusion.targets`), schedules (:mod:`debias.diffusion.schedule`), datasets
(:mod:`debias.data.datasets`), solvers, their options and default grids (:mod:`debias.solvers`), arithmetic
(:mod:`debias.solvers`), spacings (:mod:`debias.solvers.grid`), presets and the grids they fix
(:mod:`debias.solvers.presets`),
metrics (:mod:`debias.metrics.scores`), precisions (:mod:`debias.runtime`), timestep densities
(:mod:`debias.diffusion.densities`), EMAs (:mod:`debias.train.state`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

WEIGHTINGS = ("constant", "p2", "min_snr", "snr", "debias", "max_snr", "sigmoid", "edm", "learned")
WEIGHT_SPACES = ("eps", "target")
TARGETS = ("eps", "x0", "v")
SCHEDULES = ("linear", "cosine")
DATASETS = ("digits", "folder", "twemoji")
SOLVERS = ("ddpm", "ddim", "dpmsolver", "dpmsolver++", "unipc")
ARITHMETIC = ("debias", "upstream")
UNIPC_VARIANTS = ("bh1", "bh2")
DISCRETE_SPACINGS = ("even", "ddim", "linspace", "leading", "trailing")
CONTINUOUS_SPACINGS = ("time_uniform", "logSNR", "time_quadratic")
SPACINGS = (*DISCRETE_SPACINGS, *CONTINUOUS_SPACINGS)
PRESETS = ("none", "upstream")
METRICS = ("fid", "sfid", "kid", "pr", "isc")
DEVICES = ("cpu", "cuda", "auto")  # the names params.yaml takes (the library also takes cuda:N)
PRECISIONS = ("fp32", "bf16", "fp16")
EMAS = ("traditional", "phema")
DATA_LOADING = ("auto", "memory", "stream")  # the training set in memory or streamed (debias.data.batches)
TIMESTEP_DENSITIES = ("uniform", "lognormal", "logistic", "laplace", "loss_second_moment")

# each solver's default spacing: the measured best of every spacing, by FID on the embedded default at 20 steps and
# by the error against the exact answer on Gaussian data (benchmarks/grid_choice.py; the table is in README.md)
SOLVER_SPACINGS = {"ddpm": "time_quadratic", "ddim": "trailing", "dpmsolver": "linspace", "dpmsolver++": "linspace",
                   "unipc": "linspace"}
MULTISTEP_SOLVERS = ("dpmsolver", "dpmsolver++", "unipc")  # take diffusers' multistep variant of the discrete spacings
# the grid settings a sampling preset fixes per solver (debias.solvers.presets adds its other settings)
_GUIDED_DIFFUSION_GRID = {"spacing": "even", "denoise_to_zero": True}
_DPM_SOLVER_GRID = {"spacing": "time_uniform", "denoise_to_zero": False}
PRESET_GRIDS: dict[str, dict[str, dict[str, Any]]] = {
    "none": {},
    "upstream": {"ddpm": _GUIDED_DIFFUSION_GRID, "ddim": _GUIDED_DIFFUSION_GRID, "dpmsolver": _DPM_SOLVER_GRID,
                 "dpmsolver++": _DPM_SOLVER_GRID, "unipc": _DPM_SOLVER_GRID},
}

INCEPTION_BATCH_SIZE = 16  # images per Inception call: 8-16 run fastest on a CPU, 1.2x over 64 (benchmarks/BENCHMARKS.md)
PHEMA_STD_MAX = math.sqrt(1 / 12)  # σ_rel of the uniform average (γ = 0): every EMA length lies in (0, PHEMA_STD_MAX)


@dataclass(frozen=True)
class Option:
    """A solver option: its default, and what values it takes (``valid``, described by ``allowed``)."""

    default: Any
    valid: Callable[[Any], bool]
    allowed: str


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# every solver option; which solver takes which is the registry's (debias.solvers.SOLVERS)
SOLVER_OPTIONS: dict[str, Option] = {
    "eta": Option(0.0, lambda v: _number(v) and v >= 0, "a number >= 0"),                # DDIM η
    "order": Option(2, lambda v: _count(v) and v in (1, 2, 3), "1, 2 or 3"),            # DPM-Solver / UniPC
    "variant": Option("bh2", lambda v: v in UNIPC_VARIANTS, " or ".join(UNIPC_VARIANTS)),  # UniPC B(h)
    # DPM-Solver lowers the order of its final steps in runs of fewer steps than this (0: never)
    "lower_order_final": Option(15, lambda v: _count(v) and v >= 0, "a step count >= 0"),
}


def option_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not a valid value of solver option ``key`` (None if it is)."""
    option = SOLVER_OPTIONS[key]
    return None if option.valid(value) else f"must be {option.allowed}, got {value!r}"


def check_registry(registry: Iterable[str], names: tuple[str, ...], family: str) -> None:
    """A registry must implement exactly the catalogue's names, in its order."""
    if tuple(registry) != names:
        raise RuntimeError(f"the {family} registry implements {tuple(registry)}, the catalogue names {names}")
