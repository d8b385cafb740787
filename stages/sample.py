"""Stage `sample@<solver>`: draw sample.num_samples images with one solver at every sample.steps."""

from debias.checkpoints import load_checkpoint
from debias.config import Config
from debias.errors import DebiasError
from debias.pipeline import MODEL, run_stage, samples_file
from debias.sampling import generate_from_checkpoint, save_npz


def main(cfg: Config, args: list[str]) -> None:
    if len(args) != 1:
        raise DebiasError("usage: stages/sample.py SOLVER")
    solver, s = args[0], cfg.sample
    ckpt = load_checkpoint(MODEL)
    for steps in s.steps:
        images = generate_from_checkpoint(ckpt, solver=solver, steps=steps, num_samples=s.num_samples, seed=s.seed,
                                          batch_size=s.batch_size, clip_x0=s.clip_x0, spacing=s.spacing, eta=s.eta,
                                          order=s.order, variant=s.unipc_variant, ema=s.ema)
        save_npz(images, samples_file(solver, steps))


if __name__ == "__main__":
    run_stage(main)
