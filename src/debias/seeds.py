"""Seeds as an axis of comparison: runs grouped into recipes, a metric's mean and Student-t interval
over a recipe's seeds, and the paired difference of two recipes over the seeds both ran.

A run is a mapping with ``params`` — flat, dotted keys as ``debias.schema.flatten`` writes them
(``weighting``, ``train.steps``, ``seed``, ``sample.seed``) — ``metrics``, flat too (``ddim.fid``,
``ddim.kid``), and optionally a ``name``. Runs whose params agree on everything but the seed keys are
one recipe; each of its seeds is one independent draw of the recipe's score. numpy only, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SEED_KEYS = ("seed", "sample.seed")  # training and sampling seeds
TITLES = {"fid": "FID", "sfid": "sFID", "kid": "KID", "isc": "IS"}  # a metric's usual name in a sentence


def _t_mass(theta: float, df: int) -> float:
    """P(|T| ≤ √ν tan θ) for T ~ Student-t with ν = ``df`` (Abramowitz & Stegun 1964, 26.7.3–4):

    ν odd:  (2/π)·(θ + sin θ·(cos θ + (2/3) cos³θ + … + (2·4⋯(ν−3))/(1·3⋯(ν−2)) cos^(ν−2) θ)),
            2θ/π for ν = 1;
    ν even: sin θ·(1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + … + (1·3⋯(ν−3))/(2·4⋯(ν−2)) cos^(ν−2) θ).
    """
    c2, term, series = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:
        for k in range(1, (df - 1) // 2):
            term *= c2 * 2 * k / (2 * k + 1)
            series += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0))
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        series += term
    return math.sin(theta) * series


def t_quantile(level: float, df: int) -> float:
    """t such that P(|T| ≤ t) = ``level`` for T ~ Student-t with ``df`` >= 1 (integer) degrees of
    freedom — the two-sided quantile, t_{df, (1 + level)/2}: the closed-form mass of :func:`_t_mass`,
    increasing in θ on [0, π/2), solved for θ by bisection to machine precision; t = √df·tan θ."""
    if not 0 < level < 1 or df < 1:
        raise ValueError(f"need 0 < level < 1 and df >= 1, got {level}, {df}")
    low, high = 0.0, math.pi / 2
    for _ in range(64):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_mass(mid, df) < level else (low, mid)
    return math.sqrt(df) * math.tan((low + high) / 2)


@dataclass(frozen=True)
class Summary:
    """n values of a metric (one per seed): their ``mean``, sample ``std`` (ddof = 1) and the Student-t
    interval [low, high] of the mean at ``level``. One value: the mean only, std/low/high None — one
    seed says nothing about the spread; no values: all None."""

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None
    level: float


def summarize(values: Sequence[float | None], level: float = 0.95) -> Summary:
    """:class:`Summary` of the values that are not None: mean ± t_{n−1}·s/√n (Student 1908), the interval
    for the mean over seeds of the recipe, assuming the seeds' scores are independent and roughly normal."""
    x = np.array([v for v in values if v is not None], np.float64)
    if len(x) < 2:
        return Summary(len(x), float(x[0]) if len(x) else None, None, None, None, level)
    mean, std = float(x.mean()), float(x.std(ddof=1))
    half = t_quantile(level, len(x) - 1) * std / math.sqrt(len(x))
    return Summary(len(x), mean, std, mean - half, mean + half, level)


@dataclass(frozen=True)
class Recipe:
    """Runs that differ only in their seeds. ``params``: its params less the seed keys; ``distinct``: those
    whose values differ between the recipes grouped together (None: not set); ``seeds``: per run, the
    values of the seed keys; ``names``: per run; ``values``: metric → per-run value (None where the run
    lacks it), in the order of ``seeds``."""

    params: dict[str, Any]
    distinct: dict[str, Any]
    seeds: tuple[tuple[Any, ...], ...]
    names: tuple[str, ...]
    values: dict[str, tuple[float | None, ...]]

    @property
    def label(self) -> str:
        """The params that set it apart from the other recipes, e.g. ``weighting=p2``."""
        return ", ".join(f"{key}={value}" for key, value in self.distinct.items()) or "all runs"

    def summary(self, metric: str, level: float = 0.95) -> Summary:
        """``metric`` over this recipe's seeds (:func:`summarize`)."""
        return summarize(self.values.get(metric, ()), level)


def _number(value: Any) -> float | None:
    """A metric value as a float; None for what is not a number (text, flags, missing)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def group_recipes(runs: Sequence[Mapping[str, Any]], seed_keys: Sequence[str] = SEED_KEYS) -> list[Recipe]:
    """Recipes of ``runs`` (mappings with flat ``params``, ``metrics`` and an optional ``name``), in the
    order they first appear: runs whose params are equal except for ``seed_keys`` are one recipe (a
    param a run does not set counts as None). A seed is counted once per recipe: a later run with seeds
    already seen (the workspace and the commit it ran at, a repeated experiment) is left out, since it
    is no new draw. A metric is every key that some run gives a number."""
    keys = list(dict.fromkeys(k for run in runs for k in run["params"] if k not in seed_keys))
    metrics = list(dict.fromkeys(k for run in runs for k, v in run["metrics"].items() if _number(v) is not None))
    groups: dict[tuple[str, ...], list[tuple[int, Mapping[str, Any]]]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(tuple(repr(run["params"].get(k)) for k in keys), []).append((index, run))
    varying = [i for i, k in enumerate(keys) if len({identity[i] for identity in groups}) > 1]
    recipes = []
    for members in groups.values():
        kept: dict[tuple[Any, ...], tuple[int, Mapping[str, Any]]] = {}
        for index, run in members:
            kept.setdefault(tuple(run["params"].get(k) for k in seed_keys), (index, run))
        first = members[0][1]["params"]
        recipes.append(Recipe(
            params={k: v for k, v in first.items() if k not in seed_keys},
            distinct={keys[i]: first.get(keys[i]) for i in varying},
            seeds=tuple(kept),
            names=tuple(str(run.get("name", f"run {index}")) for index, run in kept.values()),
            values={m: tuple(_number(run["metrics"].get(m)) for _, run in kept.values()) for m in metrics},
        ))
    return recipes


@dataclass(frozen=True)
class Difference:
    """``first`` − ``second`` (recipe labels) on ``metric``, over the ``seeds`` both ran: the
    :class:`Summary` of the per-seed differences."""

    first: str
    second: str
    metric: str
    seeds: tuple[tuple[Any, ...], ...]
    summary: Summary


def paired_difference(first: Recipe, second: Recipe, metric: str, level: float = 0.95) -> Difference:
    """``first`` − ``second`` on ``metric``, paired by seed: d_s = first_s − second_s over the seeds both
    recipes ran and scored, summarized as mean ± t_{n−1}·s_d/√n — the paired t-interval (Student 1908),
    narrower than the two recipes' own intervals when a seed moves both scores alike. One shared seed:
    the difference only, no interval; none: n = 0."""
    a = {s: v for s, v in zip(first.seeds, first.values.get(metric, ())) if v is not None}
    b = {s: v for s, v in zip(second.seeds, second.values.get(metric, ())) if v is not None}
    shared = tuple(s for s in a if s in b)
    return Difference(first.label, second.label, metric, shared, summarize([a[s] - b[s] for s in shared], level))


def metric_title(metric: str) -> str:
    """``ddim.fid`` → ``FID ddim``: the score's usual name, then what it was measured on."""
    *where, name = metric.split(".")
    return " ".join([TITLES.get(name, name), *([".".join(where)] if where else [])])


def _number_text(value: float, scale: float, digits: int, signed: bool) -> str:
    """``value`` to the decimal of the ``digits``-th significant digit of ``scale``, with a true minus."""
    decimals = max(0, digits - 1 - math.floor(math.log10(scale))) if scale > 0 else 1
    return f"{value:{'+' if signed else ''}.{decimals}f}".replace("-", "−")


def _interval_text(summary: Summary, signed: bool) -> str:
    """``12.3 [11.0, 13.6]``, to two significant digits of the interval's half-width."""
    scale = (summary.high - summary.low) / 2 or abs(summary.mean)
    mean, low, high = (_number_text(v, scale, 2, signed) for v in (summary.mean, summary.low, summary.high))
    return f"{mean} [{low}, {high}]"


def format_cell(summary: Summary) -> str:
    """A table cell: ``12.3 [11.0, 13.6]``, ``12.3`` for one seed (no interval), ``—`` for none."""
    if summary.mean is None:
        return "—"
    return _number_text(summary.mean, abs(summary.mean), 3, False) if summary.low is None else \
        _interval_text(summary, False)


def format_summary(summary: Summary, signed: bool = False) -> str:
    """``12.3 [11.0, 13.6], 3 seeds``, to two significant digits of the interval's half-width (``signed``:
    every number with its sign); ``12.3, 1 seed (no interval)``, to three of the value; ``no values``."""
    if summary.mean is None:
        return "no values"
    if summary.low is None:
        return f"{_number_text(summary.mean, abs(summary.mean), 3, signed)}, 1 seed (no interval)"
    return f"{_interval_text(summary, signed)}, {summary.n} seeds"


def format_difference(difference: Difference, names: tuple[str, str] | None = None) -> str:
    """``debias − constant, FID ddim: −1.2 [−2.6, +0.2], 3 seeds`` (``names`` in place of the labels)."""
    first, second = names or (difference.first, difference.second)
    value = format_summary(difference.summary, signed=True) if difference.summary.n else "no shared seeds"
    return f"{first} − {second}, {metric_title(difference.metric)}: {value}"
