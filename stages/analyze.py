"""Stage `analyze`: the paper's evidence — x0 bias per timestep, colour shift vs sampling steps, and
FID vs training steps (from the snapshots the train stage kept) — on every visible GPU."""

from dataclasses import replace

from debias.analysis import channel_means, write_bias_analysis, write_color_analysis, write_fid_vs_training
from debias.config import Config
from debias.images import to_uint8
from debias.metrics.features import load_reference
from debias.models.factory import load_model
from debias.pipeline import FIGURES, MODEL, PLOTS, REFERENCE_FEATURES, SNAPSHOTS, load_prepared, on_devices, run_stage
from debias.progress import Progress
from debias.runtime import prepare_network


def main(cfg: Config, args: list[str]) -> None:
    a, s, e = cfg.analyze, cfg.sample, cfg.eval
    with on_devices(a.device, __file__, args) as (ranks, device):
        dataset = load_prepared()
        n = min(a.num_images, len(dataset))
        model = load_model(MODEL, ema=s.ema)
        model.network = prepare_network(model.network, device)
        with Progress("analyze: x0 bias", "timesteps", enabled=ranks.main) as progress:
            write_bias_analysis(model, dataset.images[:n], None if dataset.labels is None else dataset.labels[:n],
                                timesteps=a.timesteps, seed=a.seed, batch_size=s.batch_size, tsv=PLOTS / "x0_bias.tsv",
                                png=FIGURES / "x0_bias.png", device=device, progress=progress)
        color = replace(s, steps=a.color_steps, num_samples=a.color_samples, seed=a.seed)
        with Progress(f"analyze: colour shift ({a.color_solver})", "image steps", enabled=ranks.main) as progress:
            write_color_analysis(MODEL, channel_means(to_uint8(dataset.images)), a.color_solver, color,
                                 tsv=PLOTS / "color_shift.tsv", png=FIGURES / "color_shift.png",
                                 grid_png=FIGURES / "color_grid.png", device=str(device), progress=progress)
        fid = replace(s, steps=[a.fid_steps], num_samples=a.fid_samples, seed=a.seed)
        with Progress("analyze: FID of the training snapshots", "snapshots", enabled=ranks.main) as progress:
            write_fid_vs_training(sorted(SNAPSHOTS.glob("step_*.pt")), load_reference(REFERENCE_FEATURES),
                                  a.fid_solver, fid, eval_options=dict(weights=e.inception_weights,
                                                                       batch_size=e.batch_size),
                                  tsv=PLOTS / "fid_vs_train.tsv", png=FIGURES / "fid_vs_train.png",
                                  device=str(device), progress=progress)


if __name__ == "__main__":
    run_stage(main)
