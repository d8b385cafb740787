"""Regenerate the README's results (between its ``<!-- results -->`` markers) from a real run, here.

    python scripts/readme_results.py              # in the repository, with the venv active (~70 minutes)
    python scripts/readme_results.py --table      # only rewrite the block from the experiments already run
    python scripts/readme_results.py --densities  # then: the timestep-density sweep (~15 minutes more)
    python scripts/readme_results.py --learned    # then: weighting: learned (~10 minutes more)
    python scripts/readme_results.py --phema      # then: one phema training and the sample.ema_std sweep (~15 minutes)

The paper's claim under seeds: ``dvc repro`` of the default params.yaml (the baseline, weighting=debias,
seed 0), then the README's sweep — ``debias sweep`` of the paper's four recipes (constant, P2, Min-SNR,
debias) × training seeds 0, 1, 2, run with ``dvc exp run --run-all`` — timing both; then ``debias compare
--out-dir docs/results`` and the table: each recipe's FID per solver and its x̂0 bias and colour shift,
as the mean over seeds with a 95 % interval, the paired difference of each recipe from debias, and what
they allow one to conclude, with the date, the machine and the wall times.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from debias.comparison import curve, experiments_from_exp_show, recipe_name, runs_of
from debias.seeds import Summary, format_cell, format_difference, group_recipes, paired_difference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECIPES_PAGE = ROOT / "docs" / "recipes.md"  # the densities, learned and phema blocks
RESULTS = ROOT / "docs" / "results"
START, END = "<!-- results: written by scripts/readme_results.py -->", "<!-- /results -->"
DENSITY_START, DENSITY_END = "<!-- densities: written by scripts/readme_results.py --densities -->", "<!-- /densities -->"
DENSITIES = ("lognormal", "laplace", "loss_second_moment")
LEARNED_START, LEARNED_END = "<!-- learned: written by scripts/readme_results.py --learned -->", "<!-- /learned -->"
LEARNED_BASES = ("constant", "debias")
PHEMA_START, PHEMA_END = "<!-- phema: written by scripts/readme_results.py --phema -->", "<!-- /phema -->"
EMA_STDS = (0.05, 0.10, 0.15, 0.20, 0.25)
SOLVERS = ("ddpm", "ddim", "dpmsolver++", "unipc")
RECIPES = ("constant", "p2", "min_snr", "debias")  # the paper's four
SEEDS = (0, 1, 2)
SWEEP = ("debias", "sweep", "-S", f"weighting={','.join(RECIPES)}", "-S", f"seed={','.join(map(str, SEEDS))}")
RUN_QUEUE = ("dvc", "exp", "run", "--run-all", "-j", "1")
TIMES = ROOT / "docs" / "results" / "times.json"  # the wall times of the last full run, for --table


def timed(*command: str) -> float:
    """Run ``command`` in the repository (failing loudly); its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{os.cpu_count()}-core CPU ({model})" if model else f"{os.cpu_count()}-core CPU"


def experiment_records() -> list[dict]:
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], check=True, capture_output=True,
                           text=True, cwd=ROOT).stdout
    return experiments_from_exp_show(json.loads(shown))


def main() -> None:
    """The baseline, the sweep, then :func:`table`."""
    os.chdir(ROOT)
    repro = timed(sys.executable, "-m", "dvc", "repro")
    subprocess.run([sys.executable, "-m", *SWEEP], check=True)
    sweep = timed(sys.executable, "-m", *RUN_QUEUE)
    RESULTS.mkdir(parents=True, exist_ok=True)
    TIMES.write_text(json.dumps({"repro": repro, "sweep": sweep, "date": datetime.date.today().isoformat(),
                                 "machine": machine()}) + "\n")
    table()


def point(recipe, revs: dict, path: str, x: str, y: str, at) -> str:
    """The recipe's mean and interval over seeds of column ``y`` at ``x`` = ``at`` (``min``/``max``: its end)."""
    found = curve(recipe, revs, path, x, y)
    if found is None:
        return "–"
    xs, means, lows, highs = found
    i = xs.index(at(xs))
    return format_cell(Summary(len(recipe.seeds), means[i], None, lows[i], highs[i], 0.95))


def conclusion(recipes, base) -> list[str]:
    """Plain sentences: per solver, which recipes differ from debias on FID beyond their paired interval."""
    lines = []
    for solver in SOLVERS:
        better, worse, unclear = [], [], []
        for recipe in recipes:
            if recipe is base:
                continue
            d = paired_difference(recipe, base, f"{solver}.fid").summary
            if d.low is None:
                unclear.append(recipe_name(recipe))
            elif d.high < 0:
                better.append(recipe_name(recipe))
            elif d.low > 0:
                worse.append(recipe_name(recipe))
            else:
                unclear.append(recipe_name(recipe))
        parts = [f"{', '.join(better)} beat{'s' if len(better) == 1 else ''} debias" if better else "",
                 f"{', '.join(worse)} {'is' if len(worse) == 1 else 'are'} worse than debias" if worse else "",
                 f"{', '.join(unclear)} cannot be told apart from debias" if unclear else ""]
        lines.append(f"- FID {solver}: " + "; ".join(p for p in parts if p) + ".")
    return lines


def table() -> None:
    """The results block from the experiments in `dvc exp show` (the workspace and the sweep)."""
    os.chdir(ROOT)
    records = experiment_records()
    runs = runs_of(records)
    revs = {run["name"]: run["rev"] for run in runs}
    wanted = [r for r in group_recipes(runs) if r.params.get("weighting") in RECIPES]
    recipes = sorted(wanted, key=lambda r: RECIPES.index(r.params["weighting"]))
    base = next(r for r in recipes if r.params["weighting"] == "debias")
    RESULTS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "debias", "compare", "--out-dir", str(RESULTS)], cwd=ROOT, check=True)
    times = json.loads(TIMES.read_text()) if TIMES.is_file() else {}
    header = ["recipe", "seeds", *(f"FID {s}" for s in SOLVERS), "‖x̂0 bias‖ at the largest t",
              "‖colour shift‖ at 2 DDIM steps"]
    rows = [[f"{r.params['weighting']} (1/√SNR)" if r is base else r.params["weighting"], str(len(r.seeds)),
             *(format_cell(r.summary(f"{s}.fid")) for s in SOLVERS),
             point(r, revs, "plots/x0_bias.tsv", "t", "bias_norm", max),
             point(r, revs, "plots/color_shift.tsv", "steps", "shift_norm", min)] for r in recipes]
    differences = [format_difference(paired_difference(r, base, f"{s}.fid"), (r.params["weighting"], "debias"))
                   for r in recipes if r is not base for s in SOLVERS]
    when = (f"Measured {times['date']} on a {times['machine']} by `python scripts/readme_results.py`: `dvc repro` of "
            f"the default took {times['repro'] / 60:.1f} min, the sweep of {len(RECIPES)} recipes × {len(SEEDS)} "
            f"training seeds (`{' '.join(SWEEP)}`, then `{' '.join(RUN_QUEUE)}`) {times['sweep'] / 60:.0f} min."
            if times else f"Written {datetime.date.today().isoformat()} by `python scripts/readme_results.py --table`.")
    block = "\n".join([
        START, when, "",
        "Each value: the mean over the training seeds with its 95 % Student-t interval over seeds (the sampling "
        "seed is the same for every run, so recipes are compared on the same noise).", "",
        *("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows]), "",
        "Paired differences of FID (per training seed, the recipe's FID minus debias's; mean and 95 % interval):", "",
        *(f"- {line}" for line in differences), "",
        "What this allows one to say, at this scale (8×8 grey digits, 1500 steps, FID of 128 samples against 400 "
        "reference images — far below the 2048 dimensions of the features, so every FID here is biased upward "
        "by tens of points and only differences at equal sample counts mean anything):", "",
        *conclusion(recipes, base), "",
        "An interval that holds 0 says three seeds cannot tell the recipes apart here, not that they are equal; "
        "a difference that excludes 0 holds for this data, model size and budget — it does not test the "
        "paper's claim at 256² with 50k samples, and the grey digits show no colour shift to speak of.", "",
        "| x̂0 bias per timestep | colour shift vs steps | FID vs training |",
        "|---|---|---|",
        "| ![](docs/results/compare_x0_bias.png) | ![](docs/results/compare_color_shift.png) | "
        "![](docs/results/compare_fid_vs_train.png) |", "",
        "Every score with error bars: ![](docs/results/comparison.png) — the full tables: "
        "[docs/results/comparison.md](docs/results/comparison.md).",
        END,
    ])
    replace_block(START, END, block)


def replace_block(start: str, end: str, block: str, page: Path = README) -> None:
    """Put ``block`` (which begins with ``start`` and ends with ``end``) in place of ``page``'s."""
    text = page.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{page} has no {start} … {end} block")
    head, rest = text.split(start, 1)
    page.write_text(head + block + rest.split(end, 1)[1])
    print(block)


def densities() -> None:
    """The sweep of the README's density section against the baseline in the workspace: FID per solver,
    each density with the importance correction."""
    os.chdir(ROOT)
    seconds = [timed(sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name, "-S",
                     f"train.timestep_sampler={name}", "-S", "loss.importance_correction=true") for name in DENSITIES]
    records = experiment_records()
    runs = [("uniform (baseline)", next(r for r in records if r["rev"] == "workspace")),
            *((name, next(r for r in records if r["name"] == name)) for name in DENSITIES)]
    header = ["timestep_sampler", *(f"FID {s}" for s in SOLVERS)]  # (the logged MSE averages over each density's t)
    rows = [header, ["---"] * len(header)]
    for name, record in runs:
        fids = [record["metrics"].get(f"metrics/{s}.json", {}).get(s, {}).get("fid") for s in SOLVERS]
        rows.append([name, *(f"{f:.1f}" if f is not None else "–" for f in fids)])
    block = "\n".join([
        DENSITY_START,
        f"Measured {datetime.date.today().isoformat()} on a {machine()} by `python scripts/readme_results.py "
        f"--densities` (the default recipe, weighting=debias; {sum(seconds) / 60:.0f} min for the three runs):",
        "",
        *("| " + " | ".join(cells) + " |" for cells in rows),
        DENSITY_END,
    ])
    replace_block(DENSITY_START, DENSITY_END, block, RECIPES_PAGE)


def fid_cells(record: dict) -> list[str]:
    fids = [record["metrics"].get(f"metrics/{s}.json", {}).get(s, {}).get("fid") for s in SOLVERS]
    return [f"{f:.1f}" if f is not None else "–" for f in fids]


def learned() -> None:
    """``weighting: learned`` on each base in :data:`LEARNED_BASES`, against the baseline in the workspace."""
    os.chdir(ROOT)
    seconds = [timed(sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", f"learned-{base}", "-S",
                     "weighting=learned", "-S", f"loss.learned_base={base}") for base in LEARNED_BASES]
    records = experiment_records()
    runs = [("debias (baseline)", next(r for r in records if r["rev"] == "workspace")),
            *((f"learned on {base}", next(r for r in records if r["name"] == f"learned-{base}"))
              for base in LEARNED_BASES)]
    header = ["weighting", *(f"FID {s}" for s in SOLVERS)]
    rows = [header, ["---"] * len(header), *([name, *fid_cells(record)] for name, record in runs)]
    block = "\n".join([
        LEARNED_START,
        f"Measured {datetime.date.today().isoformat()} on a {machine()} by `python scripts/readme_results.py "
        f"--learned` ({sum(seconds) / 60:.0f} min for the two runs):",
        "",
        *("| " + " | ".join(cells) + " |" for cells in rows),
        LEARNED_END,
    ])
    replace_block(LEARNED_START, LEARNED_END, block, RECIPES_PAGE)


def phema_sweep() -> None:
    """One training with ``train.ema: phema`` in the workspace, then ``sample.ema_std`` over :data:`EMA_STDS`
    (only sampling and scoring rerun); params.yaml is restored at the end."""
    os.chdir(ROOT)
    try:
        trained = timed(sys.executable, "-m", "dvc", "exp", "run", "-n", "phema", "-S", "train.ema=phema")
        seconds = [timed(sys.executable, "-m", "dvc", "exp", "run", "-n", f"ema-std-{std}", "-S",
                         f"sample.ema_std={std}") for std in EMA_STDS]
    finally:
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=ROOT, check=True)
    records = experiment_records()
    runs = [("tracked profile σ_rel 0.05 (sample.ema_std: null)", next(r for r in records if r["name"] == "phema")),
            *((f"{std:.2f}", next(r for r in records if r["name"] == f"ema-std-{std}")) for std in EMA_STDS)]
    header = ["sample.ema_std", *(f"FID {s}" for s in SOLVERS)]
    rows = [header, ["---"] * len(header), *([name, *fid_cells(record)] for name, record in runs)]
    block = "\n".join([
        PHEMA_START,
        f"Measured {datetime.date.today().isoformat()} on a {machine()} by `python scripts/readme_results.py "
        f"--phema`: the training with train.ema=phema took {trained / 60:.1f} min, each EMA length after it "
        f"{sum(seconds) / len(seconds) / 60:.1f} min (sampling and scoring only):",
        "",
        *("| " + " | ".join(cells) + " |" for cells in rows),
        PHEMA_END,
    ])
    replace_block(PHEMA_START, PHEMA_END, block, RECIPES_PAGE)


if __name__ == "__main__":
    {"--table": table, "--densities": densities, "--learned": learned, "--phema": phema_sweep}.get(
        " ".join(sys.argv[1:]), main)()
