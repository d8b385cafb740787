"""Stage `sample@<solver>`: draw sample.num_samples images with one solver at every sample.steps."""

from debias.config import Config
from debias.errors import DebiasError
from debias.pipeline import MODEL, run_stage, samples_file
from debias.sampling import sample_checkpoint_steps, save_npz, solver_options


def main(cfg: Config, args: list[str]) -> None:
    if len(args) != 1:
        raise DebiasError("usage: stages/sample.py SOLVER")
    solver, s = args[0], cfg.sample
    for steps, images in sample_checkpoint_steps(MODEL, solver, s.steps, s.num_samples, s.seed, s.batch_size,
                                                 clip_x0=s.clip_x0, spacing=s.spacing, ema=s.ema, compile=s.compile,
                                                 precision=s.precision, **solver_options(solver, s)):
        save_npz(images, samples_file(solver, steps))


if __name__ == "__main__":
    run_stage(main)
