"""Samplers: golden reverse steps, analytic convergence, agreement with diffusers, per-sample noise."""

import functools
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from debias.config import config_from_dict
from debias.diffusion import targets
from debias.diffusion.schedule import Schedule, space_timesteps
from debias.errors import DebiasError
from debias.images import read_npz, save_npz, save_png_folder, save_png_grid, to_uint8
from debias.models.factory import DiffusionModel
from debias.solvers import SOLVERS, sample, solver_options
from debias.solvers.ddim import ddim_step
from debias.solvers.ddpm import ddpm_step
from debias.solvers.denoiser import Denoiser
from debias.solvers.noise import SampleNoise, sample_labels
from debias.solvers.timesteps import select_timesteps
from debias.sampling import generate, plan_for

FIXTURES = Path(__file__).parent / "fixtures"
TARGETS = ["eps", "x0", "v"]
SCHEDULES = {name: Schedule.named(name, 1000) for name in ("linear", "cosine")}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def load(name: str) -> dict:
    return torch.load(FIXTURES / name, weights_only=True)


def fake_model(output: torch.Tensor, expected_t: torch.Tensor):
    """A 'network' that returns a stored output and checks it is called at the original timesteps."""

    def model(x, t, y=None):
        assert t.dtype == torch.int64 and torch.equal(t, expected_t)
        return output

    return model


# ----------------------------------------------------------------------------- golden reverse steps

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("fixture", ["diffusion_linear_1000_respaced50.pt", "diffusion_cosine_1000.pt"])
def test_golden_full_chain_steps(fixture, target):
    g = load(fixture)
    chain = Schedule.named(g["schedule"], g["steps"])
    model = fake_model(g["model_output"], g["t"])
    denoiser = Denoiser(model, chain, target, learn_sigma=True, clip_x0=True)
    x = ddim_step(denoiser, chain, g["x_t"], g["t"], eta=0.0)
    torch.testing.assert_close(x, g[f"{target}/ddim_sample_eta0"], rtol=0, atol=1e-5)
    _, p = ddpm_step(denoiser, chain, g["x_t"], g["t"])
    torch.testing.assert_close(p.mean, g[f"{target}/p_mean"], rtol=0, atol=1e-5)
    torch.testing.assert_close(p.log_variance, g[f"{target}/p_log_variance"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_golden_respaced_steps(target):
    g = load("diffusion_linear_1000_respaced50.pt")
    full = Schedule.named(g["schedule"], g["steps"])
    chain = full.respace(select_timesteps(1000, 50, "even"))
    assert torch.equal(chain.timestep_map, g["respaced/timestep_map"])
    t = g[f"respaced/{target}/t"]
    xt = chain.q_sample(g["x0"], t, g["noise"])
    model = fake_model(g["model_output"], chain.timestep_map[t])  # the network sees ORIGINAL timesteps
    denoiser = Denoiser(model, full, target, learn_sigma=True, clip_x0=True)
    x = ddim_step(denoiser, chain, xt, t, eta=0.0)
    torch.testing.assert_close(x, g[f"respaced/{target}/ddim_sample_eta0"], rtol=0, atol=1e-5)
    x_prev, p = ddpm_step(denoiser, chain, xt, t, noise=torch.zeros_like(xt))
    torch.testing.assert_close(p.mean, g[f"respaced/{target}/p_mean"], rtol=0, atol=1e-5)
    torch.testing.assert_close(p.log_variance, g[f"respaced/{target}/p_log_variance"], rtol=0, atol=1e-5)
    torch.testing.assert_close(x_prev, p.mean)


# ----------------------------------------------------------------------------- timestep selection

@pytest.mark.parametrize("steps", [1, 7, 10, 50, 333])
def test_even_spacing_is_guided_diffusion(steps):
    assert select_timesteps(1000, steps, "even") == space_timesteps(1000, str(steps))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("T,steps", [(1000, 10), (1000, 7), (1000, 999), (100, 30), (4000, 50)])
def test_spacings_match_diffusers(spacing, T, steps):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    def diffusers_timesteps(cls):
        scheduler = cls(num_train_timesteps=T, timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        return sorted(scheduler.timesteps.tolist())

    assert select_timesteps(T, steps, spacing, multistep=True) == diffusers_timesteps(DPMSolverMultistepScheduler)
    assert select_timesteps(T, steps, spacing, multistep=True) == diffusers_timesteps(UniPCMultistepScheduler)
    assert select_timesteps(T, steps, spacing) == diffusers_timesteps(DDIMScheduler)


def test_timestep_errors():
    with pytest.raises(ValueError, match="1001 steps"):
        select_timesteps(1000, 1001, "even")
    with pytest.raises(ValueError, match="spacing"):
        select_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="steps"):
        select_timesteps(1000, 0, "trailing")
    assert select_timesteps(1000, 1000, "trailing") == list(range(1000))
    assert select_timesteps(1000, 1000, "linspace") == list(range(1000))
    for spacing in ("linspace", "leading"):  # steps + 1 points cannot be distinct: diffusers would repeat one
        with pytest.raises(ValueError, match="repeats"):
            select_timesteps(1000, 1000, spacing, multistep=True)


# ----------------------------------------------------------------------------- analytic Gaussian data

MU, S = 0.3, 0.5


def gaussian_denoiser(schedule: Schedule, target: str, mu: float = MU, s: float = S):
    """The exact model for data x0 ~ N(mu, s²) per pixel: E[x0 | x_t] = mu + α s²/(α² s² + σ²)(x_t − α mu),
    returned as the prediction of ``target`` (ε and v derived from it)."""
    def model(x, t, y=None):
        a = schedule.alpha.to(x.dtype)[t].reshape(-1, 1, 1, 1)
        sg = schedule.sigma.to(x.dtype)[t].reshape(-1, 1, 1, 1)
        x0 = mu + a * s**2 / (a**2 * s**2 + sg**2) * (x - a * mu)
        return targets.target_from(target, x0, (x - a * x0) / sg, a, sg)

    return model


@functools.cache
def gaussian_x_T(schedule_name: str) -> torch.Tensor:
    """4096 pixels with exactly the mean and std of the true marginal at t = T-1, so that all remaining
    error in the samples' mean and std is the solver's (every step is affine in x for this model)."""
    schedule = SCHEDULES[schedule_name]
    a, sg = float(schedule.alpha[-1]), float(schedule.sigma[-1])
    z = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean()) / z.std()
    return (a * MU + math.sqrt(a**2 * S**2 + sg**2) * z).float()


@functools.cache
def moment_error(solver: str, options: tuple, target: str, schedule_name: str, steps: int) -> float:
    """|mean − μ| + |std − s| of the samples of a deterministic solver for Gaussian data."""
    schedule = SCHEDULES[schedule_name]
    denoiser = Denoiser(gaussian_denoiser(schedule, target), schedule, target, False, clip_x0=False)
    x = sample(solver, denoiser, gaussian_x_T(schedule_name), steps, spacing="trailing", **dict(options)).double()
    return abs(x.mean().item() - MU) + abs(x.std().item() - S)


DETERMINISTIC = [pytest.param("ddim", (), id="ddim")] + [
    pytest.param(name, (("order", k),), id=f"{name}-{k}") for name in ("dpmsolver", "dpmsolver++") for k in (1, 2, 3)
] + [pytest.param("unipc", (("order", k), ("variant", v)), id=f"unipc-{v}-{k}") for v in ("bh1", "bh2") for k in (2, 3)]


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("solver,options", DETERMINISTIC)
def test_deterministic_solvers_converge_on_gaussian_data(solver, options, target, schedule_name):
    """The sample moments approach the data's as steps grow; multistep solvers beat DDIM at 10 steps.

    Timesteps use ``trailing`` spacing. (With guided-diffusion's ``even`` spacing the linear schedule's
    last interval t = 111 → 0 spans Δλ ≈ 3.6 at 10 steps, and on this smooth toy problem the multistep
    extrapolation over it overshoots: the ordering vs DDIM is then not a property of the solvers.)
    """
    errors = [moment_error(solver, options, target, schedule_name, steps) for steps in (5, 10, 50)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.03
    order = dict(options).get("order", 1)
    if order > 1:
        assert errors[1] < 0.8 * moment_error("ddim", (), target, schedule_name, 10)


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_first_order_solvers_are_ddim(schedule_name):
    """DPM-Solver-1 = DPM-Solver++-1 = DDIM (η = 0) on the same timesteps (Lu et al. 2022a, §4.1)."""
    schedule = SCHEDULES[schedule_name]
    model, x_T = gaussian_denoiser(schedule, "v"), gaussian_x_T(schedule_name).double()
    denoiser = Denoiser(model, schedule, "v", False, clip_x0=True)
    ref = sample("ddim", denoiser, x_T, 10, spacing="even")
    for name in ("dpmsolver", "dpmsolver++"):
        x = sample(name, denoiser, x_T, 10, spacing="even", order=1)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("learn_sigma_value", [-1.0, 1.0])
def test_ddpm_matches_data_distribution(learn_sigma_value):
    """Ancestral sampling with the exact denoiser over the full chain reproduces N(μ, s²), with the
    learned-variance channel at either end of its range (v = −1: β̃_t, v = +1: β_t)."""
    schedule = SCHEDULES["linear"]
    exact = gaussian_denoiser(schedule, "eps")

    def learned(x, t, y=None):
        return torch.cat([exact(x, t), torch.full_like(x, learn_sigma_value)], dim=1)

    noise = SampleNoise(seed=1, indices=[0], shape=(1, 128, 128))
    x = sample("ddpm", Denoiser(learned, schedule, "eps", True, clip_x0=False), noise.draw(), 1000, spacing="even",
               noise=noise)
    assert abs(x.mean().item() - MU) < 0.015 and abs(x.std().item() - S) < 0.015


def test_ddpm_uses_the_learned_variance():
    """v = −1 is exactly the fixed "small" variance β̃ of a C-channel model; v = +1 (β) is not."""
    schedule = SCHEDULES["cosine"]
    exact = gaussian_denoiser(schedule, "x0")

    def run(model, learn_sigma):
        noise = SampleNoise(seed=2, indices=range(4), shape=(1, 8, 8))
        return sample("ddpm", Denoiser(model, schedule, "x0", learn_sigma), noise.draw(), 20, spacing="even",
                      noise=noise)

    fixed = run(exact, False)
    for value, same in [(-1.0, True), (1.0, False)]:
        learned = run(lambda x, t, y=None: torch.cat([exact(x, t), torch.full_like(x, value)], dim=1), True)
        assert torch.allclose(learned, fixed, atol=1e-6) == same


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver", "dpmsolver++", "unipc"])
def test_float32_matches_float64(solver):
    """Coefficients are computed in float64, so float32 sampling loses nothing even where ᾱ = 2.4e-9."""
    schedule = SCHEDULES["cosine"]
    model, x_T = gaussian_denoiser(schedule, "eps"), gaussian_x_T("cosine")[..., :8, :8]
    denoiser = Denoiser(model, schedule, "eps", False, clip_x0=False)
    x32 = sample(solver, denoiser, x_T, 10, spacing="trailing")
    x64 = sample(solver, denoiser, x_T.double(), 10, spacing="trailing")
    assert x32.dtype == torch.float32 and x64.dtype == torch.float64
    torch.testing.assert_close(x32.double(), x64, rtol=0, atol=2e-5)


def test_ode_solvers_ignore_variance_channels():
    schedule = SCHEDULES["cosine"]
    exact = gaussian_denoiser(schedule, "x0")

    def learned(x, t, y=None):
        return torch.cat([exact(x, t), torch.rand_like(x) * 2 - 1], dim=1)

    x_T = gaussian_x_T("cosine")
    for name in ("ddim", "dpmsolver", "dpmsolver++", "unipc"):
        torch.testing.assert_close(sample(name, Denoiser(learned, schedule, "x0", True), x_T, 6),
                                   sample(name, Denoiser(exact, schedule, "x0", False), x_T, 6), rtol=0, atol=0)


def test_ddim_eta_one_is_stochastic_and_eta_zero_ignores_noise():
    schedule = SCHEDULES["linear"]
    model = gaussian_denoiser(schedule, "eps")
    x_T = gaussian_x_T("linear")
    denoiser = Denoiser(model, schedule, "eps", False)
    a = sample("ddim", denoiser, x_T, 20, noise=SampleNoise(0, [0], (1, 64, 64)), eta=1.0)
    b = sample("ddim", denoiser, x_T, 20, noise=SampleNoise(1, [0], (1, 64, 64)), eta=1.0)
    c = sample("ddim", denoiser, x_T, 20, eta=0.0)
    assert (a - b).abs().max() > 0.1 and (a - c).abs().max() > 0.1
    with pytest.raises(ValueError, match="noise"):
        sample("ddim", denoiser, x_T, 20, eta=0.5)
    with pytest.raises(ValueError, match="noise"):
        sample("ddpm", denoiser, x_T, 20)


# ----------------------------------------------------------------------------- agreement with diffusers

def run_diffusers(scheduler, model, x_T, steps, final_data_prediction=False):
    """diffusers' sampling loop; optionally the last step returns the scheduler's data prediction."""
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for k, t in enumerate(scheduler.timesteps):
        output = model(x, t.reshape(1))
        if final_data_prediction and k == len(scheduler.timesteps) - 1:
            return scheduler.convert_model_output(output, sample=x)
        x = scheduler.step(output, t, x).prev_sample
    return x


def cross_check_case(schedule_name, target, clip):
    schedule = SCHEDULES[schedule_name]
    # μ = 0.8 puts many x0 predictions beyond 1 so that clipping matters
    model = gaussian_denoiser(schedule, target, mu=0.8 if clip else MU)
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    common = dict(num_train_timesteps=1000, trained_betas=schedule.betas.numpy(),
                  prediction_type=DIFFUSERS_PREDICTION[target])
    # diffusers keeps its σ table in float32; at the last cosine step ᾱ = 2.4e-9 and x0 = (x − σ ε)/α
    # amplifies that rounding, so ε-prediction there agrees to ~1e-3 (ours stays within 1e-5 of a
    # float64 run, see test_float32_matches_float64)
    tol = 2e-3 if (schedule_name, target) == ("cosine", "eps") else 1e-4
    return schedule, model, x_T, common, tol


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("target", TARGETS)
def test_ddim_matches_diffusers(target, schedule_name, clip):
    """DDIMScheduler(set_alpha_to_one=True, clip_sample=clip). Its prev_timestep is t − T//steps, which is
    the next selected timestep for ``leading`` and ``trailing`` but not for ``linspace`` (there we go
    to the next selected timestep instead)."""
    from diffusers import DDIMScheduler

    schedule, model, x_T, common, tol = cross_check_case(schedule_name, target, clip)
    for spacing in ("leading", "trailing"):
        for steps in (4, 10, 25):
            scheduler = DDIMScheduler(**common, clip_sample=clip, clip_sample_range=1.0, set_alpha_to_one=True,
                                      timestep_spacing=spacing)
            theirs = run_diffusers(scheduler, model, x_T, steps)
            ours = sample("ddim", Denoiser(model, schedule, target, False, clip), x_T, steps, spacing=spacing)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=tol)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("target", TARGETS)
def test_dpm_solver_pp_matches_diffusers(target, schedule_name, clip):
    """DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint" (2M),
    lower_order_final=True, final_sigmas_type="zero"; clip = thresholding with sample_max_value=1)."""
    from diffusers import DPMSolverMultistepScheduler

    schedule, model, x_T, common, tol = cross_check_case(schedule_name, target, clip)
    for spacing, order, steps in [("linspace", 2, 10), ("trailing", 2, 20), ("leading", 2, 6), ("linspace", 1, 10),
                                  ("trailing", 3, 10), ("linspace", 3, 20)]:
        theirs = run_diffusers(DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=order, solver_type="midpoint",
            lower_order_final=True, final_sigmas_type="zero", thresholding=clip, sample_max_value=1.0,
            timestep_spacing=spacing), model, x_T, steps)
        ours = sample("dpmsolver++", Denoiser(model, schedule, target, False, clip), x_T, steps, spacing=spacing,
                      order=order)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=tol)


def test_dpm_solver_pp_even_spacing_matches_diffusers_custom_timesteps():
    from diffusers import DPMSolverMultistepScheduler

    schedule, model, x_T, common, tol = cross_check_case("linear", "eps", False)
    scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(timesteps=select_timesteps(1000, 10, "even")[::-1])
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.reshape(1)), t, x).prev_sample
    torch.testing.assert_close(sample("dpmsolver++", Denoiser(model, schedule, "eps", False, clip_x0=False), x_T, 10,
                                      spacing="even"), x,
                               rtol=0, atol=tol)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("target", TARGETS)
def test_unipc_matches_diffusers(target, schedule_name, clip):
    """UniPCMultistepScheduler(predict_x0=True, lower_order_final=True, disable_corrector=[],
    final_sigmas_type="zero"). For bh1 diffusers' last step computes −∞·0 = NaN (B(h) = ĥ with σ = 0),
    so there we compare with its data prediction at the last timestep, which is what that step returns."""
    from diffusers import UniPCMultistepScheduler

    schedule, model, x_T, common, tol = cross_check_case(schedule_name, target, clip)
    for spacing, variant, order, steps in [("linspace", "bh2", 2, 10), ("trailing", "bh2", 2, 20),
                                           ("leading", "bh2", 2, 7), ("linspace", "bh2", 3, 10),
                                           ("trailing", "bh1", 2, 10), ("linspace", "bh1", 3, 20),
                                           ("trailing", "bh2", 1, 10)]:
        theirs = run_diffusers(UniPCMultistepScheduler(
            **common, solver_order=order, solver_type=variant, predict_x0=True, lower_order_final=True,
            disable_corrector=[], final_sigmas_type="zero", thresholding=clip, sample_max_value=1.0,
            timestep_spacing=spacing), model, x_T, steps, final_data_prediction=variant == "bh1")
        ours = sample("unipc", Denoiser(model, schedule, target, False, clip), x_T, steps, spacing=spacing,
                      order=order, variant=variant)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=tol)


# ----------------------------------------------------------------------------- registry and options

def test_registry_covers_the_configured_solvers():
    assert tuple(SOLVERS) == ("ddpm", "ddim", "dpmsolver", "dpmsolver++", "unipc")
    assert config_from_dict({}, [f"sample.solvers=[{', '.join(SOLVERS)}]"]).sample.solvers == list(SOLVERS)
    with pytest.raises(ValueError, match="unknown solver"):
        sample("euler", None, None, 1)
    with pytest.raises(ValueError, match="does not apply"):
        solver_options("ddim", {"order": 2})
    with pytest.raises(ValueError, match="variant"):
        solver_options("unipc", {"variant": "bh3"})
    with pytest.raises(ValueError, match="order"):
        solver_options("dpmsolver", {"order": 4})
    assert solver_options("unipc", {"order": 3}) == {"order": 3, "variant": "bh2"}
    with pytest.raises(DebiasError, match="sample.order"):
        config_from_dict({}, ["sample.order=4"])


@pytest.mark.parametrize("solver", SOLVERS)
def test_each_sampler_makes_steps_model_calls_and_reports_progress(solver):
    schedule = Schedule.named("cosine", 50)
    calls, reports = [], []
    exact = gaussian_denoiser(schedule, "eps")

    def model(x, t, y=None):
        calls.append(t[0].item())
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        return exact(x, t)

    noise = SampleNoise(0, range(3), (1, 2, 2))
    x = sample(solver, Denoiser(model, schedule, "eps", False), noise.draw(), 7, spacing="even", noise=noise,
               progress=lambda done, total: reports.append((done, total)))
    assert x.shape == (3, 1, 2, 2) and torch.isfinite(x).all()
    assert len(calls) == 7 and calls == sorted(calls, reverse=True) and calls[0] == 49
    assert reports[-1] == (7, 7) and len(reports) == 7


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("denoise_to_zero", [True, False])
def test_each_sampler_calls_continuous_grids_at_fractional_timesteps(solver, denoise_to_zero):
    """On a continuous spacing every solver makes `steps` calls at its float64 timesteps, highest first."""
    schedule, calls = Schedule.named("linear", 100), []

    def model(x, t, y=None):
        assert t.dtype == torch.float64 and t.shape == (x.shape[0],)
        calls.append(t[0].item())
        return 0.1 * x

    noise = SampleNoise(0, range(2), (1, 2, 2))
    x = sample(solver, Denoiser(model, schedule, "eps", False), noise.draw(), 6, spacing="time_uniform",
               denoise_to_zero=denoise_to_zero, noise=noise)
    assert torch.isfinite(x).all() and len(calls) == 6 and calls == sorted(calls, reverse=True)
    assert calls[0] == pytest.approx(99) and any(not float(c).is_integer() for c in calls)


# ----------------------------------------------------------------------------- per-sample noise and generate

def test_sample_noise_depends_only_on_seed_and_index():
    whole = SampleNoise(5, range(8), (3, 4, 4))
    part = SampleNoise(5, [6, 2], (3, 4, 4))
    for _ in range(3):
        a, b = whole.draw(), part.draw()
        assert a.shape == (8, 3, 4, 4)
        assert torch.equal(b[0], a[6]) and torch.equal(b[1], a[2])
    assert not torch.equal(SampleNoise(6, [2], (3, 4, 4)).draw()[0], SampleNoise(5, [2], (3, 4, 4)).draw()[0])
    assert torch.equal(sample_labels(5, [6, 2], 10), sample_labels(5, range(8), 10)[[6, 2]])
    assert len(set(sample_labels(0, range(200), 10).tolist())) == 10


class TinyConditionalModel(torch.nn.Module):
    """A smooth class-conditional stand-in for a UNet (ε-prediction of shrunk-Gaussian data)."""

    def forward(self, x, t, y=None):
        assert y is not None and y.shape == (x.shape[0],)
        return 0.5 * x + 0.1 * y.reshape(-1, 1, 1, 1) + 1e-4 * t.reshape(-1, 1, 1, 1)


def tiny_model() -> DiffusionModel:
    return DiffusionModel(TinyConditionalModel(), Schedule.named("linear", 100), "eps", False, (1, 4, 4), num_classes=3)


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "unipc"])
def test_generate_is_batch_size_invariant(solver):
    options = {"eta": 1.0} if solver == "ddim" else {}

    def run(batch_size, class_labels=None, **kwargs):
        plan = plan_for(solver, seed=7, batch_size=batch_size, class_labels=class_labels, **options)
        return generate(tiny_model(), plan, 8, 8, **kwargs)

    a, b = run(3), run(8)
    assert a.dtype == torch.uint8 and a.shape == (8, 1, 4, 4)
    assert torch.equal(a, b)
    assert torch.equal(run(2, indices=[5, 6, 7]), a[5:])
    assert not torch.equal(run(8, class_labels=[0]), run(8, class_labels=[2]))
    with pytest.raises(ValueError, match="out of range"):
        run(8, class_labels=[3])


DISTRIBUTED_WORKER = """
import sys, torch, torch.distributed as dist
from debias.diffusion.schedule import Schedule
from debias.models.factory import DiffusionModel
from debias.sampling import generate, plan_for

class Model(torch.nn.Module):
    def forward(self, x, t, y=None):
        return 0.5 * x + 0.1 * y.reshape(-1, 1, 1, 1) + 1e-4 * t.reshape(-1, 1, 1, 1)

dist.init_process_group("gloo")
model = DiffusionModel(Model(), Schedule.named("linear", 100), "eps", False, (1, 4, 4), num_classes=3)
images = generate(model, plan_for("ddpm", seed=3, batch_size=2), 5, 7)
torch.save(images, sys.argv[1] + f"/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


def test_generate_under_torch_distributed_equals_one_process(tmp_path):
    """Two gloo ranks each sample a slice of the indices; the all-gathered result equals one process's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(DISTRIBUTED_WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=dict(env, RANK=str(rank)))
             for rank in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    single = generate(tiny_model(), plan_for("ddpm", seed=3, batch_size=4), 5, 7)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), single)


# ----------------------------------------------------------------------------- conversion and writers

def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.996, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 254, 255, 255]


@pytest.mark.parametrize("channels", [1, 3])
def test_writers_round_trip(tmp_path, channels):
    images = torch.randint(0, 256, (5, channels, 6, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    save_png_grid(images, tmp_path / "grid.png", nrow=3, padding=1)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (1 + 3 * 5, 1 + 2 * 7)
        arr = np.asarray(grid).reshape(grid.size[1], grid.size[0], -1)
    np.testing.assert_array_equal(arr[1 + 7:1 + 7 + 6, 1 + 5:1 + 5 + 4], images[4].permute(1, 2, 0).numpy())
    save_npz(images, tmp_path / "x.npz")
    assert torch.equal(read_npz(tmp_path / "x.npz"), images)
    save_png_folder(images, tmp_path / "pngs", indices=range(10, 15))
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [f"{i:06d}.png" for i in range(10, 15)]
    assert not [p for p in tmp_path.rglob("*.tmp")]
