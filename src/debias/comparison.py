"""`debias compare`: recipes across DVC experiments, with seeds as an axis.

The runs of `dvc exp show --json` (the workspace, commits, experiments) are grouped into recipes — runs whose
params differ only in ``seed`` / ``sample.seed`` (:func:`debias.seeds.group_recipes`) — and every score the
evaluate stages wrote is reported as its mean over the recipe's seeds with a Student-t interval, beside the
paired difference of each recipe from the first (the workspace's), seed by seed. Figures: every score per
recipe and solver with error bars, the analysis curves (x̂0 bias, colour shift, FID vs training) averaged
over seeds with their intervals, and each recipe's sample grid enlarged.
"""

from __future__ import annotations

import io
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from debias.errors import DebiasError
from debias.figures import plot_lines, plt, save_figure
from debias.io import atomic_write, parse_tsv, write_text
from debias.report import TIMING, markdown_table
from debias.schema import flatten
from debias.seeds import (SEED_KEYS, Recipe, format_cell, format_difference, group_recipes, metric_title,
                          paired_difference, summarize)

LEVEL = 0.95
SCORES = ("fid", "sfid", "kid", "precision", "recall", "isc")  # the evaluate stage's headline, in this order
BETTER = {"fid": "lower", "sfid": "lower", "kid": "lower", "precision": "higher", "recall": "higher", "isc": "higher"}
CURVES = {  # plots file → (x column, y column, title, x label, y label, log x, log y)
    "plots/x0_bias.tsv": ("t", "bias_norm", "x̂0 bias per timestep", "timestep t", "‖x̂0 bias‖ (mean over images)",
                          False, True),
    "plots/color_shift.tsv": ("steps", "shift_norm", "colour shift vs sampling steps", "sampling steps",
                              "‖colour shift‖ (channel means)", True, False),
    "plots/fid_vs_train.tsv": ("train_step", "fid", "FID vs training steps", "training step", "FID (lower is better)",
                               False, False),
}
GRID_WIDTH = 512  # sample grids are enlarged (nearest neighbour) to at least this many pixels across


def experiments_from_exp_show(data: Any) -> list[dict]:
    """Flatten `dvc exp show --json` into records {name, rev, params (params.yaml dict), metrics {file: dict}}."""
    found: list[dict] = []

    def walk(node: Any, name: str | None) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, name)
        elif isinstance(node, dict):
            label = node.get("name") or name or node.get("rev")
            payload = node.get("data")
            if isinstance(payload, dict) and "params" in payload:
                params = (payload.get("params") or {}).get("params.yaml", {}).get("data", {})
                metrics = {f: v["data"] for f, v in (payload.get("metrics") or {}).items()
                           if isinstance(v, dict) and isinstance(v.get("data"), dict)}
                if metrics:
                    found.append({"name": label or payload.get("rev", "?"), "rev": payload.get("rev", "workspace"),
                                  "params": params, "metrics": metrics})
            for key in ("experiments", "revs"):
                if key in node:
                    walk(node[key], label if key == "revs" else None)

    walk(data, None)
    return found


def runs_of(experiments: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Records of :func:`experiments_from_exp_show` as runs for :func:`debias.seeds.group_recipes`: flat
    ``params`` (``train.steps``) and ``metrics`` (``ddim.fid``; timings left out, they differ between
    identical runs), ``name`` and ``rev``."""
    return [{"name": e["name"], "rev": e["rev"], "params": flatten(e["params"]),
             "metrics": {key: value for data in e["metrics"].values() for key, value in flatten(data).items()
                         if not key.endswith(TIMING)}} for e in experiments]


def recipe_name(recipe: Recipe) -> str:
    """What sets the recipe apart (``weighting=p2``), or its weighting and target when nothing does."""
    return recipe.label if recipe.distinct else f"{recipe.params.get('weighting')}, {recipe.params.get('target')}"


def score_keys(recipes: Sequence[Recipe]) -> list[str]:
    """The ``<solver>.<score>`` metrics of the recipes, by solver, then in the order of :data:`SCORES`."""
    keys = {k for r in recipes for k in r.values if k.count(".") == 1 and k.split(".")[1] in SCORES}
    return sorted(keys, key=lambda k: (k.split(".")[0], SCORES.index(k.split(".")[1])))


def tsv_at(rev: str, path: str) -> list[dict] | None:
    """A TSV as committed at ``rev`` (an experiment's commit), or from the working tree for the workspace."""
    data = file_at(rev, path)
    return parse_tsv(io.StringIO(data.decode())) if data else None


def file_at(rev: str, path: str) -> bytes | None:
    """A file's bytes at ``rev`` (the working tree for ``workspace``); None where it is absent."""
    if rev == "workspace":
        return Path(path).read_bytes() if Path(path).is_file() else None
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True)
    return shown.stdout if shown.returncode == 0 else None


def comparison_markdown(recipes: Sequence[Recipe], runs: int, grids: Mapping[str, str]) -> str:
    """The tables: each recipe's seeds and FID per solver; every score per solver; the paired difference of each
    recipe from the first on every score; the figures and the sample ``grids`` (caption → file name)."""
    keys = score_keys(recipes)
    names = [recipe_name(r) for r in recipes]
    parts = ["# Recipe comparison", "",
             f"{runs} runs in {len(recipes)} recipes: runs whose params differ only in {' / '.join(SEED_KEYS)} are "
             f"one recipe. Each value is the mean over the recipe's seeds with its {LEVEL:.0%} Student-t interval "
             "[low, high]; a recipe with one seed has no interval (its spread is unknown).", "",
             markdown_table(["recipe", "weighting", "target", "seeds", *(metric_title(k) for k in keys if
                                                                         k.endswith(".fid"))],
                            [[name, r.params.get("weighting"), r.params.get("target"), len(r.seeds),
                              *(format_cell(r.summary(k, LEVEL)) for k in keys if k.endswith(".fid"))]
                             for name, r in zip(names, recipes)]), ""]
    for solver in dict.fromkeys(k.split(".")[0] for k in keys):
        columns = [k for k in keys if k.startswith(f"{solver}.")]
        parts += [f"## {solver}: every score", "",
                  markdown_table(["recipe", *(f"{metric_title(k)} ({BETTER[k.split('.')[1]]} is better)"
                                              for k in columns)],
                                 [[name, *(format_cell(r.summary(k, LEVEL)) for k in columns)]
                                  for name, r in zip(names, recipes)]), ""]
    if len(recipes) > 1:
        parts += [f"## Paired differences from {names[0]}", "",
                  "Per seed that both recipes ran, the difference of their scores; the mean with its paired "
                  f"{LEVEL:.0%} t-interval. An interval that holds 0 does not tell the recipes apart.", ""]
        for name, recipe in zip(names[1:], recipes[1:]):
            parts += [f"- {format_difference(paired_difference(recipe, recipes[0], k, LEVEL), (name, names[0]))}"
                      for k in keys]
        parts.append("")
    parts += ["## Figures", "", "![every score](comparison.png)", ""]
    if grids:
        parts += ["## Samples", ""] + [f"**{caption}**\n\n![{caption}]({name})\n" for caption, name in grids.items()]
    return "\n".join(parts)


def plot_scores(path: Path, recipes: Sequence[Recipe]) -> None:
    """One panel per score, bars per solver and recipe with the interval over seeds as error bars."""
    keys = score_keys(recipes)
    scores = list(dict.fromkeys(k.split(".")[1] for k in keys))
    solvers = list(dict.fromkeys(k.split(".")[0] for k in keys))
    fig, axes = plt.subplots(1, len(scores), figsize=(max(4.0, 0.9 * len(recipes) * len(solvers)) * len(scores) / 2
                                                      + 2, 3.8), squeeze=False)
    width = 0.8 / max(1, len(recipes))
    for ax, score in zip(axes[0], scores):
        for j, recipe in enumerate(recipes):
            found = [recipe.summary(f"{solver}.{score}", LEVEL) for solver in solvers]
            means = [s.mean if s.mean is not None else np.nan for s in found]
            errors = np.array([[s.mean - s.low, s.high - s.mean] if s.low is not None else [0.0, 0.0]
                               for s in found]).T
            ax.bar([i + j * width for i in range(len(solvers))], means, width, yerr=errors, capsize=3,
                   label=recipe_name(recipe))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(solvers))])
        ax.set_xticklabels(solvers, fontsize=8)
        ax.set(title=f"{metric_title(score)} ({BETTER[score]} is better)", xlabel="solver")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"mean over seeds, error bars: {LEVEL:.0%} interval (none for one seed)", fontsize=8)
    save_figure(fig, path)


def curve(recipe: Recipe, revs: Mapping[str, str], path: str, x: str, y: str):
    """(xs, means, lows, highs) of column ``y`` against ``x`` over the recipe's runs that have the file, at the
    x values every one of them has; None when none has it."""
    tables = [rows for rows in (tsv_at(revs[name], path) for name in recipe.names) if rows]
    if not tables:
        return None
    xs = sorted(set.intersection(*({row[x] for row in rows} for rows in tables)))
    found = [summarize([next(row[y] for row in rows if row[x] == at) for rows in tables], LEVEL) for at in xs]
    return xs, [s.mean for s in found], [s.low for s in found], [s.high for s in found]


def enlarged_grid(data: bytes, path: Path) -> None:
    """A sample grid PNG enlarged by an integer factor (nearest neighbour) to at least :data:`GRID_WIDTH` px."""
    image = Image.open(io.BytesIO(data))
    scale = max(1, -(-GRID_WIDTH // image.width))
    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    atomic_write(path, lambda f: big.save(f, format="PNG"))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "recipe"


def compare_experiments(exp_show: Any, out_dir: str | Path) -> list[Path]:
    """From `dvc exp show --json`: comparison.md, comparison.png (every score with error bars), each analysis curve
    with one line per recipe (mean and interval over its seeds) and each recipe's sample grids enlarged. Returns
    the files written."""
    experiments = experiments_from_exp_show(exp_show)
    if not experiments:
        raise DebiasError("no experiments with metrics found (run `dvc repro` or `dvc exp run` first)")
    runs = runs_of(experiments)
    recipes, revs = group_recipes(runs), {run["name"]: run["rev"] for run in runs}
    out_dir = Path(out_dir)
    md, png = out_dir / "comparison.md", out_dir / "comparison.png"
    plot_scores(png, recipes)
    written, grids = [png], {}
    for path, (x, y, title, xlabel, ylabel, logx, logy) in CURVES.items():
        found = {recipe_name(r): curve(r, revs, path, x, y) for r in recipes}
        found = {name: c for name, c in found.items() if c}
        if found:
            figure = out_dir / f"compare_{Path(path).stem}.png"
            plot_lines(figure, {name: c[:2] for name, c in found.items()}, title=title, xlabel=xlabel, ylabel=ylabel,
                       logx=logx, logy=logy, bands={name: c[2:] for name, c in found.items()})
            written.append(figure)
    for recipe in recipes:
        for solver in dict.fromkeys(k.split(".")[0] for k in score_keys([recipe])):
            data = file_at(revs[recipe.names[0]], f"reports/grid_{solver}.png")
            if data:
                grid = out_dir / f"grid_{slug(recipe_name(recipe))}_{solver}.png"
                enlarged_grid(data, grid)
                written.append(grid)
                grids[f"{recipe_name(recipe)}, {solver} (seed of {recipe.names[0]})"] = grid.name
    write_text(md, comparison_markdown(recipes, len(runs), grids))
    return [md, *written]
