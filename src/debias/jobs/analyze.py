"""Job `analyze`: the paper's evidence for one model — the x̂0 bias per timestep, the colour shift against
sampling steps and, given training snapshots, FID against training steps — on every visible GPU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from debias.analysis import channel_means, write_bias_analysis, write_color_analysis, write_fid_vs_training
from debias.config import AnalyzeConfig, Config, EvalConfig, SampleConfig
from debias.data.prepared import open_prepared
from debias.images import ImageArray, from_uint8
from debias.metrics.features import Features, FeatureStats, load_reference
from debias.models.factory import load_model
from debias.pipeline import FIGURES, MODEL, PLOTS, PREPARED, REFERENCE_FEATURES, SNAPSHOTS
from debias.progress import Progress
from debias.runtime import Ranks, on_devices, prepare_network


@dataclass(frozen=True)
class AnalysisFiles:
    """Where the analysis goes: its tables (``x0_bias.tsv``, ``color_shift.tsv``, ``fid_vs_train.tsv``) and its
    figures (``x0_bias.png``, ``color_shift.png``, ``color_grid.png``, ``fid_vs_train.png``)."""

    tables: Path
    figures: Path


def analyze(a: AnalyzeConfig, s: SampleConfig, e: EvalConfig, checkpoint: Path, images: Tensor | ImageArray,
            labels: Tensor | None, files: AnalysisFiles, *, ranks: Ranks, device: torch.device,
            snapshots: Sequence[Path] = (), reference: Features | FeatureStats | None = None) -> None:
    """Analyse the model of ``checkpoint`` against real uint8 ``images`` (N, C, H, W) — a tensor or an
    :class:`~debias.images.ImageArray`, read in blocks — (``labels`` (N,) for a class-conditional model) with the
    analyze params ``a``, sample params ``s`` (and, for the FID, eval params ``e``); with ``snapshots`` and a FID
    ``reference`` also FID against training steps."""
    model = load_model(checkpoint, ema=s.ema)
    model.network = prepare_network(model.network, device)
    n = min(a.num_images, len(images))
    with Progress("analyze: x0 bias", "timesteps", enabled=ranks.main) as progress:
        write_bias_analysis(model, from_uint8(images[:n]), None if labels is None else labels[:n], timesteps=a.timesteps,
                            seed=a.seed, batch_size=s.batch_size, tsv=files.tables / "x0_bias.tsv",
                            png=files.figures / "x0_bias.png", device=device, progress=progress)
    with Progress(f"analyze: colour shift ({a.color_solver})", "image steps", enabled=ranks.main) as progress:
        write_color_analysis(checkpoint, channel_means(images), a.color_solver, s, steps=a.color_steps,
                             num_samples=a.color_samples, seed=a.seed, tsv=files.tables / "color_shift.tsv",
                             png=files.figures / "color_shift.png", grid_png=files.figures / "color_grid.png",
                             device=str(device), progress=progress)
    if reference is None:
        return
    with Progress("analyze: FID of the training snapshots", "snapshots", enabled=ranks.main) as progress:
        write_fid_vs_training(sorted(snapshots), reference, a.fid_solver, s, steps=a.fid_steps,
                              num_samples=a.fid_samples, seed=a.seed,
                              eval_options=dict(weights=e.inception_weights, batch_size=e.batch_size),
                              tsv=files.tables / "fid_vs_train.tsv", png=files.figures / "fid_vs_train.png",
                              device=str(device), progress=progress)


def analyze_stage(cfg: Config, argv: list[str]) -> None:
    """Stage ``analyze``: models/model.pt against the prepared training set, and the FID of models/snapshots/
    against the prepared reference, into plots/ (tables) and plots/figures/."""
    with on_devices(cfg.analyze.device, argv) as (ranks, device):
        prepared = open_prepared(PREPARED)
        analyze(cfg.analyze, cfg.sample, cfg.eval, MODEL, prepared.images, prepared.labels, AnalysisFiles(PLOTS, FIGURES), ranks=ranks,
                device=device, snapshots=sorted(SNAPSHOTS.glob("step_*.pt")), reference=load_reference(REFERENCE_FEATURES))
