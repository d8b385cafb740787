"""Stage `sample@<solver>`: sample.num_samples images with one solver at every sample.steps, streamed
to disk in chunks (chunks/<solver>/, from which a killed run resumes), on every visible GPU — from
models/model.pt, or with sample.ema_std from the post-hoc EMA of that length rebuilt from models/phema/."""

from debias.config import Config
from debias.errors import DebiasError
from debias.posthoc import sampling_checkpoint
from debias.pipeline import MODEL, chunks_dir, on_devices, run_stage, samples_file
from debias.progress import Progress
from debias.sampling import prepare_sampler
from debias.streaming import clear_chunks, sample_to_file


def main(cfg: Config, args: list[str]) -> None:
    if len(args) != 1:
        raise DebiasError("usage: stages/sample.py SOLVER")
    solver, s = args[0], cfg.sample
    with on_devices(s.device, __file__, args) as (ranks, device), sampling_checkpoint(MODEL, s.ema_std) as model:
        sampler = prepare_sampler(model, solver, s, device=str(device))
        for steps in s.steps:  # DVC deletes the outputs of a killed run; the chunks of each step count stay
            with Progress(f"sample@{solver} {steps} steps", "image steps", enabled=ranks.main) as progress:
                sample_to_file(sampler, steps, samples_file(solver, steps), "npz", chunks_dir(solver, steps),
                               s.chunk_size, progress, keep_chunks=True)
        if ranks.main:
            for steps in s.steps:
                clear_chunks(chunks_dir(solver, steps))


if __name__ == "__main__":
    run_stage(main)
