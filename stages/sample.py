"""Stage `sample@<solver>`: draw sample.num_samples images with one solver at every sample.steps."""

from debias.config import Config
from debias.errors import DebiasError
from debias.images import save_npz
from debias.pipeline import MODEL, run_stage, samples_file
from debias.sampling import sample_checkpoint


def main(cfg: Config, args: list[str]) -> None:
    if len(args) != 1:
        raise DebiasError("usage: stages/sample.py SOLVER")
    solver = args[0]
    for steps, images in sample_checkpoint(MODEL, solver, cfg.sample):
        save_npz(images, samples_file(solver, steps))


if __name__ == "__main__":
    run_stage(main)
