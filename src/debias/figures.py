"""Plotting helpers: every figure is a PNG written atomically, drawn with matplotlib's Agg backend."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from debias.io import atomic_write  # noqa: E402


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_lines(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
               bands: Mapping[str, tuple[Sequence[float | None], Sequence[float | None]]] | None = None) -> None:
    """One line per series (label → (xs, ys)), saved as PNG; ``bands`` (label → (lows, highs), None where
    unknown) are drawn as error bars."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, (xs, ys) in series.items():
        lows, highs = (bands or {}).get(label, (None, None))
        known = lows is not None and any(v is not None for v in lows)
        errors = [[y - low if low is not None else 0.0 for y, low in zip(ys, lows)],
                  [high - y if high is not None else 0.0 for y, high in zip(ys, highs)]] if known else None
        ax.errorbar(xs, ys, yerr=errors, marker="o", markersize=3, capsize=3 if known else 0, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:  # ticks at the data, written plainly (2, 3, 5, …, not 2×10⁰)
        ax.set_xscale("log")
        ax.set_xticks(sorted({x for xs, _ in series.values() for x in xs}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def save_sample_rows(path: str | Path, rows: Mapping[str, torch.Tensor]) -> None:
    """A labelled grid: one row per entry (label → uint8 images (n, C, H, W)), e.g. the same seeds
    sampled with 2, 3, 5, … steps (the paper's Figure 1 layout)."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.1 * len(rows)), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows.items()):
        strip = torch.cat(list(images.permute(0, 2, 3, 1)), dim=1).numpy()
        ax.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    save_figure(fig, path)
