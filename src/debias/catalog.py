"""The names of every registry family — what params.yaml, ``dvc exp run -S`` and the CLI accept — in one
module that imports nothing, so that the command line offers them as choices without loading torch.

Each registry binds its implementations to exactly these names and checks it when it is imported
(:func:`check_registry`): weightings and weight spaces (:mod:`debias.diffusion.weighting`), targets
(:mod:`debias.diffusion.targets`), schedules (:mod:`debias.diffusion.schedule`), datasets
(:mod:`debias.data`), solvers, arithmetic (:mod:`debias.samplers`), UniPC variants
(:mod:`debias.samplers.unipc`), spacings (:mod:`debias.samplers.grid`), presets
(:mod:`debias.samplers.presets`), metrics (:mod:`debias.metrics.scores`), devices and precisions
(:mod:`debias.runtime`), timestep samplers (:mod:`debias.diffusion.densities`), EMAs
(:mod:`debias.train.state`).
"""

from __future__ import annotations

from collections.abc import Iterable

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
TIMESTEP_SAMPLERS = ("uniform", "lognormal", "logistic", "laplace", "loss_second_moment")


def check_registry(registry: Iterable[str], names: tuple[str, ...], family: str) -> None:
    """A registry must implement exactly the catalogue's names, in its order."""
    if tuple(registry) != names:
        raise RuntimeError(f"the {family} registry implements {tuple(registry)}, the catalogue names {names}")
