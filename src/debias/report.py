"""The run report, reports/report.md (the comparison across experiments: :mod:`debias.comparison`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from debias.io import write_text


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return "—" if value is None else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


METRIC_COLUMNS = {"FID": "fid", "FID interval": "fid_interval", "sFID": "sfid", "KID": "kid",
                  "precision": "precision", "recall": "recall", "seconds": "seconds"}
TIMING = ("images_per_s", "seconds")  # metrics that differ between identical runs


def _interval(row: Mapping[str, Any], metric: str) -> str | None:
    """``[low, high]`` of the per-step table's ``<metric>_low`` / ``<metric>_high`` columns, if it has them."""
    low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    return None if low is None or high is None else f"[{_fmt(low)}, {_fmt(high)}]"


def metrics_rows(steps_by_solver: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[list[Any]]:
    """Rows solver × step count of :data:`METRIC_COLUMNS` from the evaluate stages' per-step tables."""
    return [[solver, int(row["steps"]), *[_interval(row, "fid") if key == "fid_interval" else row.get(key)
                                           for key in METRIC_COLUMNS.values()]]
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
                  f"{provenance.get('n_generated')} generated vs {provenance.get('n_reference')} reference images. "
                  "FID interval: a bootstrap of the generated samples against the fixed reference statistics "
                  "(metrics/<solver>.intervals.json; eval.bootstrap, eval.interval_level). At this few samples FID is "
                  "biased upward: compare runs at equal counts, and over training seeds (`debias compare`).", ""]
    parts += ["## Training", "", markdown_table(["", "value"], [[k, v] for k, v in training.items()]), ""]
    if figures:
        parts += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    if grids:
        parts += ["## Samples", ""] + [f"**{solver}**\n\n![{solver}]({grid})\n" for solver, grid in grids.items()]
    write_text(path, "\n".join(parts) + "\n")
