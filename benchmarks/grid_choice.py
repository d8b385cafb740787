"""Which spacing each solver should use by default: accuracy against the exact answer, and FID.

- ``--exact``: data x0 ~ N(μ, s²) per pixel has the exact denoiser E[x0 | x_t] = μ + α s²/(α² s² + σ²)(x_t − α μ)
  (the harness of tests/test_samplers.py), and the probability-flow ODE maps x_T to exactly
  x0 = μ + s (x_T − α_T μ)/√(α_T² s² + σ_T²). The error of a deterministic solver is the RMS distance of
  its samples from that answer (4096 pixels); DDPM, which is stochastic, gets |mean − μ| + |std − s| of
  its samples from an x_T with exactly the marginal's moments. Per solver, spacing and step count, on
  the linear schedule (T = 1000, ε-prediction, no clipping, default options, ending at σ = 0).
- ``--fid MODEL``: FID of ``--n`` samples per solver and spacing at ``--steps`` steps against the
  pipeline's reference features (data/reference_features.npz of a finished ``dvc repro``).

    python benchmarks/grid_choice.py --exact
    python benchmarks/grid_choice.py --fid models/model.pt --steps 20 --n 128
"""

from __future__ import annotations

import argparse
import math

import torch

from debias.config import SampleConfig
from debias.diffusion import targets
from debias.diffusion.schedule import Schedule
from debias.errors import DebiasError
from debias.metrics.features import load_reference
from debias.metrics.scores import compute_metrics
from debias.solvers import SOLVERS, sample
from debias.solvers.denoiser import Denoiser
from debias.solvers.grid import SPACINGS
from debias.solvers.noise import SampleNoise
from debias.sampling import sample_checkpoint

MU, S = 0.3, 0.5


def exact_denoiser(schedule: Schedule):
    def network(x, t, y=None):
        index = t.round().long() if t.is_floating_point() else t
        a = schedule.alpha.to(x.dtype)[index].reshape(-1, 1, 1, 1)
        sg = schedule.sigma.to(x.dtype)[index].reshape(-1, 1, 1, 1)
        if t.is_floating_point():  # fractional timesteps: α, σ of the interpolated log α
            k = t.clamp(0, schedule.num_timesteps - 1)
            lo, hi = k.floor().long(), k.ceil().long()
            log_a = torch.lerp(schedule.alpha.log()[lo], schedule.alpha.log()[hi], (k - lo).double())
            a = log_a.exp().to(x.dtype).reshape(-1, 1, 1, 1)
            sg = (-torch.expm1(2 * log_a)).sqrt().to(x.dtype).reshape(-1, 1, 1, 1)
        x0 = MU + a * S**2 / (a**2 * S**2 + sg**2) * (x - a * MU)
        return targets.target_from("eps", x0, (x - a * x0) / sg, a, sg)

    return network


def exact_errors(steps: list[int]) -> None:
    schedule = Schedule.named("linear", 1000)
    a, sg = float(schedule.alpha[-1]), float(schedule.sigma[-1])
    z = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = (a * MU + math.sqrt(a**2 * S**2 + sg**2) * (z - z.mean()) / z.std()).float()
    print(f"| solver | spacing | {' | '.join(f'{n} steps' for n in steps)} |")
    print(f"|---|---|{'---|' * len(steps)}")
    for solver in SOLVERS:
        for spacing in SPACINGS:
            errors = []
            for n in steps:
                noise = SampleNoise(0, [0], (1, 64, 64))
                noise.draw()
                try:
                    x = sample(solver, Denoiser(exact_denoiser(schedule), schedule, "eps", False, clip_x0=False),
                               x_T, n, spacing=spacing, noise=noise).double()
                    if solver == "ddpm":
                        errors.append(f"{abs(x.mean().item() - MU) + abs(x.std().item() - S):.4f}")
                    else:
                        exact = MU + S * (x_T.double() - a * MU) / math.sqrt(a**2 * S**2 + sg**2)
                        errors.append(f"{(x - exact).pow(2).mean().sqrt().item():.4f}")
                except DebiasError:
                    errors.append("—")
            print(f"| {solver} | {spacing} | {' | '.join(errors)} |", flush=True)


def fid_by_spacing(model: str, steps: int, n: int) -> None:
    reference = load_reference("data/reference_features.npz")
    print(f"| solver | spacing | FID ({n} samples, {steps} steps) |\n|---|---|---|")
    for solver in SOLVERS:
        for spacing in SPACINGS:
            cfg = SampleConfig(steps=[steps], num_samples=n, batch_size=n, spacing=spacing)
            try:
                (_, images), = sample_checkpoint(model, solver, cfg)
            except DebiasError:
                print(f"| {solver} | {spacing} | — |", flush=True)
                continue
            fid = compute_metrics(images, reference, metrics=("fid",))["fid"]
            print(f"| {solver} | {spacing} | {fid:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exact", action="store_true", help="errors against the exact answer on Gaussian data")
    parser.add_argument("--fid", metavar="MODEL", help="FID per solver and spacing of this checkpoint")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--n", type=int, default=128)
    args = parser.parse_args()
    if args.exact:
        exact_errors(args.steps)
    if args.fid:
        fid_by_spacing(args.fid, args.steps[0], args.n)


if __name__ == "__main__":
    main()
