"""Job `report`: reports/report.md with the metrics per solver and step count, the recipe, training
curves, the analysis figures and a sample grid per solver."""

from __future__ import annotations

import json

from debias.config import Config
from debias.figures import plot_lines
from debias.images import read_npz, save_png_grid
from debias.io import read_tsv
from debias.pipeline import FIGURES, LOGS, REPORTS, provenance_file, samples_file, steps_table
from debias.report import render_report


def report_stage(cfg: Config, argv: list[str]) -> None:
    """Stage ``report``: from the train, evaluate and analyze stages' outputs."""
    solvers = cfg.sample.solvers
    log = read_tsv(LOGS / "train_log.tsv")
    steps = [r["step"] for r in log]
    plot_lines(REPORTS / "train_loss.png", {"weighted loss": (steps, [r["loss"] for r in log]),
                                            "unweighted MSE": (steps, [r["mse"] for r in log])},
               title="training", xlabel="step", ylabel="loss", logy=True)
    grids = {}
    for solver in solvers:
        images = read_npz(samples_file(solver, cfg.sample.steps[0]))[:64]
        # tiny images are enlarged (nearest) so a person can see them
        save_png_grid(images, REPORTS / f"grid_{solver}.png", scale=max(1, 48 // images.shape[-1]))
        grids[f"{solver}, {cfg.sample.steps[0]} steps"] = f"grid_{solver}.png"
    last = log[-1] if log else {}
    render_report(
        REPORTS / "report.md",
        recipe={"weighting": cfg.weighting, "target": cfg.target, "dataset": cfg.data.name,
                "schedule": f"{cfg.diffusion.schedule}, T={cfg.diffusion.steps}", "train steps": cfg.train.steps,
                "batch size": cfg.train.batch_size, "samples per solver": cfg.sample.num_samples},
        steps_by_solver={solver: read_tsv(steps_table(solver)) for solver in solvers},
        provenance=json.loads(provenance_file(solvers[0]).read_text()) if solvers else None,
        training={"final step": int(last.get("step", 0)), "final loss": last.get("loss"),
                  "final unweighted MSE": last.get("mse"), "images/s": last.get("images_per_s")},
        figures=["train_loss.png"] + [f"../{FIGURES}/{name}" for name in
                                      ("x0_bias.png", "color_shift.png", "color_grid.png", "fid_vs_train.png")],
        grids=grids)
