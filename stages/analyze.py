"""Stage `analyze`: the paper's evidence — x0 bias per timestep, colour shift vs sampling steps, and
FID vs training steps (from the snapshots the train stage kept)."""

from debias.analysis import (bias_table, channel_means, color_shift, evaluation_timesteps, shift_table,
                             x0_bias_per_timestep)
from debias.checkpoints import load_checkpoint
from debias.config import Config
from debias.io import write_tsv
from debias.metrics import compute_metrics, load_features
from debias.models.factory import model_from_checkpoint
from debias.pipeline import FIGURES, MODEL, PLOTS, REFERENCE_FEATURES, SNAPSHOTS, load_prepared, run_stage, to_uint8
from debias.report import plot_lines, save_sample_rows
from debias.diffusion.schedule import Schedule
from debias.sampling import sample_checkpoint, solver_options


def main(cfg: Config, args: list[str]) -> None:
    a, s = cfg.analyze, cfg.sample
    ckpt = load_checkpoint(MODEL)
    dataset = load_prepared()
    sampling = dict(batch_size=s.batch_size, clip_x0=s.clip_x0, spacing=s.spacing, ema=s.ema)

    # x0 bias per timestep on real images
    schedule = Schedule.named(ckpt.config["diffusion"]["schedule"], ckpt.config["diffusion"]["steps"])
    model = model_from_checkpoint(ckpt, ema=s.ema, source=str(MODEL))
    n = min(a.num_images, len(dataset))
    labels = dataset.labels[:n] if dataset.labels is not None and model.num_classes else None
    rows = x0_bias_per_timestep(model, schedule, ckpt.config["target"], ckpt.config["model"]["learn_sigma"],
                                dataset.images[:n], evaluation_timesteps(schedule.num_timesteps, a.timesteps),
                                seed=a.seed, batch_size=s.batch_size, labels=labels)
    table = bias_table(rows)
    write_tsv(PLOTS / "x0_bias.tsv", table)
    ts = [r["t"] for r in table]
    plot_lines(FIGURES / "x0_bias.png", {"‖bias‖": (ts, [r["bias_norm"] for r in table]),
                                        "MSE": (ts, [r["mse"] for r in table])},
               title=f"x̂0 error per timestep ({cfg.weighting}, {cfg.target})", xlabel="t", ylabel="x̂0 error", logy=True)

    # colour shift vs number of sampling steps (same seeds at every step count)
    samples = {steps: sample_checkpoint(MODEL, solver=a.color_solver, steps=steps, num_samples=a.color_samples,
                                        seed=a.seed, **sampling, **solver_options(a.color_solver, s))
               for steps in a.color_steps}
    shift = shift_table(color_shift(samples, channel_means(to_uint8(dataset.images))))
    write_tsv(PLOTS / "color_shift.tsv", shift)
    plot_lines(FIGURES / "color_shift.png", {"‖mean shift‖": ([r["steps"] for r in shift], [r["shift_norm"] for r in shift])},
               title=f"colour shift vs steps ({a.color_solver})", xlabel="sampling steps", ylabel="‖sample mean − data mean‖",
               logx=True)
    save_sample_rows(FIGURES / "color_grid.png", {f"{k} steps": v[:8] for k, v in samples.items()})

    # FID vs training iterations
    reference = load_features(REFERENCE_FEATURES)
    fid_rows = []
    for path in sorted(SNAPSHOTS.glob("step_*.pt")):
        images = sample_checkpoint(path, solver=a.fid_solver, steps=a.fid_steps, num_samples=a.fid_samples,
                                   seed=a.seed, **sampling, **solver_options(a.fid_solver, s))
        result = compute_metrics(images, reference, weights=cfg.eval.inception_weights, metrics=("fid",),
                                 batch_size=cfg.eval.batch_size, device=cfg.eval.device)
        fid_rows.append({"train_step": int(path.stem.removeprefix("step_")), "fid": result["fid"]})
    write_tsv(PLOTS / "fid_vs_train.tsv", fid_rows)
    plot_lines(FIGURES / "fid_vs_train.png", {"FID": ([r["train_step"] for r in fid_rows], [r["fid"] for r in fid_rows])},
               title=f"FID vs training ({a.fid_solver}, {a.fid_steps} steps)", xlabel="training step", ylabel="FID")


if __name__ == "__main__":
    run_stage(main)
