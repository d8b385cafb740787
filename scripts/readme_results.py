"""Regenerate the README's results (between its ``<!-- results -->`` markers) from a real run, here.

    python scripts/readme_results.py              # in the repository, with the venv active
    python scripts/readme_results.py --densities  # then: the timestep-density sweep (~15 minutes more)
    python scripts/readme_results.py --learned    # then: weighting: learned (~10 minutes more)
    python scripts/readme_results.py --phema      # then: one phema training and the sample.ema_std sweep (~15 minutes)

Runs ``dvc repro`` on the default params.yaml (the baseline, weighting=debias) and ``dvc exp run --temp -n
constant -S weighting=constant``, timing both; then ``debias compare --out-dir docs/results`` and the DDIM
sample grid of each recipe, and writes the table of FIDs, x̂0 bias, colour shift and FID-vs-training with
the date, the machine and the wall times. Takes ~15 minutes on a 2-core CPU.
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

from debias.report import tsv_at, distinct_recipes, experiments_from_exp_show

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results"
START, END = "<!-- results: written by scripts/readme_results.py -->", "<!-- /results -->"
DENSITY_START, DENSITY_END = "<!-- densities: written by scripts/readme_results.py --densities -->", "<!-- /densities -->"
DENSITIES = ("lognormal", "laplace", "loss_second_moment")
LEARNED_START, LEARNED_END = "<!-- learned: written by scripts/readme_results.py --learned -->", "<!-- /learned -->"
LEARNED_BASES = ("constant", "debias")
PHEMA_START, PHEMA_END = "<!-- phema: written by scripts/readme_results.py --phema -->", "<!-- /phema -->"
EMA_STDS = (0.05, 0.10, 0.15, 0.20, 0.25)
SOLVERS = ("ddpm", "ddim", "dpmsolver++", "unipc")
EXPERIMENT = "constant"


def timed(*command: str) -> float:
    """Run ``command`` in the repository (failing loudly); its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{os.cpu_count()}-core CPU ({model})" if model else f"{os.cpu_count()}-core CPU"


def row(recipe: dict) -> list[str]:
    """FID per solver, ‖x̂0 bias‖ at the largest t, ‖colour shift‖ at the fewest DDIM steps, FID of the snapshots."""
    rev = recipe["rev"]
    fids = [recipe["metrics"].get(f"metrics/{s}.json", {}).get(s, {}).get("fid") for s in SOLVERS]
    bias = max(tsv_at(rev, "plots/x0_bias.tsv"), key=lambda r: r["t"])["bias_norm"]
    shift = min(tsv_at(rev, "plots/color_shift.tsv"), key=lambda r: r["steps"])["shift_norm"]
    train = " / ".join(f"{r['fid']:.1f}" for r in tsv_at(rev, "plots/fid_vs_train.tsv"))
    p = recipe["params"]
    name = f"{p['weighting']} (1/√SNR)" if p["weighting"] == "debias" else p["weighting"]
    return [name, *(f"{f:.1f}" if f is not None else "–" for f in fids), f"{bias:.3f}", f"{shift:.3f}", train]


def grid(rev: str, name: str) -> None:
    """The recipe's DDIM sample grid (reports/ is committed with each experiment) as docs/results/NAME."""
    data = (ROOT / "reports" / "grid_ddim.png").read_bytes() if rev == "workspace" else subprocess.run(
        ["git", "show", f"{rev}:reports/grid_ddim.png"], cwd=ROOT, check=True, capture_output=True).stdout
    (RESULTS / name).write_bytes(data)


def main() -> None:
    os.chdir(ROOT)
    repro = timed(sys.executable, "-m", "dvc", "repro")
    experiment = timed(sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", EXPERIMENT, "-S",
                       f"weighting={EXPERIMENT}")
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], check=True, capture_output=True,
                           text=True).stdout
    records = experiments_from_exp_show(json.loads(shown))
    baseline = next(r for r in records if r["rev"] == "workspace")
    other = next(r for r in records if r["name"] == EXPERIMENT)
    RESULTS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "debias", "compare", "--out-dir", str(RESULTS)], cwd=ROOT, check=True)
    grid(baseline["rev"], "grid_ddim_debias.png")
    grid(other["rev"], f"grid_ddim_{EXPERIMENT}.png")
    steps = baseline["params"]["train"]["snapshot_steps"]
    header = ["recipe", *(f"FID {s}" for s in SOLVERS), "‖x̂0 bias‖ at t=999", "‖colour shift‖ at 2 DDIM steps",
              f"FID of snapshots {' / '.join(map(str, steps))} (ddim)"]
    table = [header, ["---"] * len(header), *(row(r) for r in distinct_recipes([baseline, other]))]
    today = datetime.date.today().isoformat()
    block = "\n".join([
        START,
        f"Measured {today} on a {machine()} by `python scripts/readme_results.py`: `dvc repro` of the default "
        f"took {repro / 60:.1f} min (every stage, after `pip install`), `dvc exp run --temp -n {EXPERIMENT} -S "
        f"weighting={EXPERIMENT}` {experiment / 60:.1f} min.",
        "",
        *("| " + " | ".join(cells) + " |" for cells in table),
        "",
        "| x̂0 bias per timestep | colour shift vs steps | FID vs training |",
        "|---|---|---|",
        "| ![](docs/results/compare_x0_bias.png) | ![](docs/results/compare_color_shift.png) | "
        "![](docs/results/compare_fid_vs_train.png) |",
        "",
        f"Samples (DDIM, same seeds): debias ![](docs/results/grid_ddim_debias.png) {EXPERIMENT} "
        f"![](docs/results/grid_ddim_{EXPERIMENT}.png)",
        END,
    ])
    replace_block(START, END, block)


def replace_block(start: str, end: str, block: str) -> None:
    """Put ``block`` (which begins with ``start`` and ends with ``end``) in place of the README's."""
    text = README.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{README} has no {start} … {end} block")
    head, rest = text.split(start, 1)
    README.write_text(head + block + rest.split(end, 1)[1])
    print(block)


def densities() -> None:
    """The sweep of the README's density section against the baseline in the workspace: FID per solver,
    each density with the importance correction."""
    os.chdir(ROOT)
    seconds = [timed(sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name, "-S",
                     f"train.timestep_sampler={name}", "-S", "loss.importance_correction=true") for name in DENSITIES]
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], check=True, capture_output=True,
                           text=True).stdout
    records = experiments_from_exp_show(json.loads(shown))
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
    replace_block(DENSITY_START, DENSITY_END, block)


def fid_cells(record: dict) -> list[str]:
    fids = [record["metrics"].get(f"metrics/{s}.json", {}).get(s, {}).get("fid") for s in SOLVERS]
    return [f"{f:.1f}" if f is not None else "–" for f in fids]


def experiment_records() -> list[dict]:
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], check=True, capture_output=True,
                           text=True).stdout
    return experiments_from_exp_show(json.loads(shown))


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
    replace_block(LEARNED_START, LEARNED_END, block)


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
    replace_block(PHEMA_START, PHEMA_END, block)


if __name__ == "__main__":
    {"--densities": densities, "--learned": learned, "--phema": phema_sweep}.get(" ".join(sys.argv[1:]), main)()
