"""Human-facing outputs: the run report and the cross-experiment comparison (figures: :mod:`debias.figures`)."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from debias.errors import DebiasError
from debias.figures import plot_lines, plt, save_figure
from debias.io import parse_tsv, write_text
from debias.schema import flatten


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return "—" if value is None else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


METRIC_COLUMNS = {"FID": "fid", "sFID": "sfid", "KID": "kid", "precision": "precision", "recall": "recall",
                  "seconds": "seconds"}
TIMING = ("images_per_s", "seconds")  # metrics that differ between identical runs


def metrics_rows(steps_by_solver: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[list[Any]]:
    """Rows solver × step count of :data:`METRIC_COLUMNS` from the evaluate stages' per-step tables."""
    return [[solver, int(row["steps"]), *[row.get(key) for key in METRIC_COLUMNS.values()]]
            for solver, rows in steps_by_solver.items() for row in rows]


def render_report(path: str | Path, *, recipe: Mapping[str, Any],
                  steps_by_solver: Mapping[str, Sequence[Mapping[str, Any]]], provenance: Mapping[str, Any] | None,
                  training: Mapping[str, Any], figures: Sequence[str], grids: Mapping[str, str]) -> None:
    """The run's markdown report: recipe, metrics per solver and step count, training summary, figures,
    sample grids."""
    parts = ["# debias run report", "", "## Recipe", "",
             markdown_table(["key", "value"], [[k, v] for k, v in recipe.items()]), "",
             "## Sample quality", "",
             markdown_table(["solver", "steps", *METRIC_COLUMNS], metrics_rows(steps_by_solver)), ""]
    if provenance:
        parts += [f"Features: `{provenance.get('extractor')}`, weights sha256 `{str(provenance.get('weights_sha256'))[:16]}…` "
                  f"({provenance.get('weights_source')}), torch-fidelity {provenance.get('torch_fidelity_version')}; "
                  f"{provenance.get('n_generated')} generated vs {provenance.get('n_reference')} reference images.", ""]
    parts += ["## Training", "", markdown_table(["", "value"], [[k, v] for k, v in training.items()]), ""]
    if figures:
        parts += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    if grids:
        parts += ["## Samples", ""] + [f"**{solver}**\n\n![{solver}]({grid})\n" for solver, grid in grids.items()]
    write_text(path, "\n".join(parts) + "\n")


def experiments_from_exp_show(data: Any) -> list[dict]:
    """Flatten `dvc exp show --json` into records {name, params (params.yaml dict), metrics {file: dict}}."""
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


def distinct_recipes(experiments: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Each recipe once, with a readable ``label``: the params that set it apart from the first (the
    workspace, or the newest commit), e.g. ``weighting=p2``; the first as ``<weighting>, <target>``.

    Records with the same params and metrics (timings aside) are one recipe (the workspace, the commit it was run at,
    and an experiment that repeats it); the same params with other metrics (other code) are told
    apart by their revision."""
    recipes: list[dict] = []
    seen: dict[str, dict] = {}
    base = flatten(experiments[0]["params"]) if experiments else {}
    for e in experiments:
        params = flatten(e["params"])
        quality = {k: v for k, v in flatten(e["metrics"]).items() if not k.endswith(TIMING)}
        key = repr(sorted(params.items())) + repr(sorted(quality.items()))
        if key in seen:
            continue
        changed = [f"{k}={params.get(k)}" for k in sorted(set(params) | set(base)) if params.get(k) != base.get(k)]
        label = ", ".join(changed) or f"{params.get('weighting')}, {params.get('target')}"
        if any(r["label"] == label for r in recipes):
            label = f"{label} ({str(e['rev'])[:7]})"
        seen[key] = {**e, "label": label}
        recipes.append(seen[key])
    return recipes


def comparison_rows(recipes: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Paper-style table: one row per recipe (label, weighting, target), one FID column per solver."""
    solvers = sorted({Path(f).stem for e in recipes for f in e["metrics"] if f.startswith("metrics/")})
    rows = []
    for e in recipes:
        p = e["params"]
        fids = {Path(f).stem: m.get(Path(f).stem, m).get("fid") for f, m in e["metrics"].items()
                if f.startswith("metrics/")}
        rows.append([e["label"], p.get("weighting"), p.get("target"), *[fids.get(s) for s in solvers]])
    return ["recipe", "weighting", "target", *[f"FID {s}" for s in solvers]], rows


def render_comparison(out_dir: str | Path, recipes: Sequence[Mapping[str, Any]]) -> tuple[Path, Path]:
    """Write ``comparison.md`` and ``comparison.png`` (FID per recipe and solver) into ``out_dir``."""
    out_dir = Path(out_dir)
    header, rows = comparison_rows(recipes)
    solvers = [h[4:] for h in header[3:]]
    md = out_dir / "comparison.md"
    write_text(md, "# Recipe comparison\n\n" + markdown_table(header, rows) + "\n")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(rows) * max(1, len(solvers)) / 2), 3.6))
    width = 0.8 / max(1, len(solvers))
    for j, solver in enumerate(solvers):
        xs = [i + j * width for i in range(len(rows))]
        ax.bar(xs, [r[3 + j] if isinstance(r[3 + j], (int, float)) else 0 for r in rows], width, label=solver)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r[0] for r in rows], fontsize=7)
    ax.set(ylabel="FID (lower is better)", title="FID per recipe and solver")
    ax.legend(fontsize=7)
    png = out_dir / "comparison.png"
    save_figure(fig, png)
    return md, png


CURVES = {  # plots file → (x column, y column, title, log x, log y)
    "plots/x0_bias.tsv": ("t", "bias_norm", "x̂0 bias per timestep", False, True),
    "plots/color_shift.tsv": ("steps", "shift_norm", "colour shift vs sampling steps", True, False),
    "plots/fid_vs_train.tsv": ("train_step", "fid", "FID vs training steps", False, False),
}


def tsv_at(rev: str, path: str) -> list[dict] | None:
    """A TSV as committed at ``rev`` (an experiment's commit), or from the working tree for the workspace."""
    if rev == "workspace":
        text = Path(path).read_text() if Path(path).is_file() else None
    else:
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
        text = shown.stdout if shown.returncode == 0 else None
    return parse_tsv(io.StringIO(text)) if text else None


def compare_experiments(exp_show: Any, out_dir: str | Path) -> list[Path]:
    """From `dvc exp show --json`: the FID table and bar chart, plus each analysis curve with one
    line per experiment. Returns the files written."""
    recipes = distinct_recipes(experiments_from_exp_show(exp_show))
    if not recipes:
        raise DebiasError("no experiments with metrics found (run `dvc repro` or `dvc exp run` first)")
    out_dir = Path(out_dir)
    written = list(render_comparison(out_dir, recipes))
    for path, (x, y, title, logx, logy) in CURVES.items():
        series = {}
        for e in recipes:
            rows = tsv_at(e["rev"], path)
            if rows:
                series[e["label"]] = ([r[x] for r in rows], [r[y] for r in rows])
        if series:
            png = out_dir / f"compare_{Path(path).stem}.png"
            plot_lines(png, series, title=title, xlabel=x, ylabel=y, logx=logx, logy=logy)
            written.append(png)
    return written
