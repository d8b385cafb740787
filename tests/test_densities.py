"""Timestep densities (debias.diffusion.densities): each density's draws follow its pmf, the importance
correction gives the uniform objective exactly, and loss_second_moment samples ∝ sqrt(E[L²])."""

import math

import pytest
import torch
from scipy import stats

from debias.config import config_from_dict
from debias.diffusion.densities import DEFAULTS, HISTORY, UNIFORM_MIX, TimestepDensity, log_snr_pmf
from debias.diffusion.losses import diffusion_loss
from debias.diffusion.schedule import Schedule
from debias.diffusion.weighting import weight_table
from debias.runtime import Ranks

ONE = Ranks(rank=0, world=1, local_rank=0)
SCHEDULE = Schedule.named("linear", 1000)
LAMBDA = SCHEDULE.snr.log()


def sampler(name: str, **kw) -> TimestepDensity:
    return TimestepDensity(name, LAMBDA, torch.device("cpu"), ONE, **kw)


@pytest.mark.parametrize("name", ["uniform", "lognormal", "logistic", "laplace"])
def test_draws_follow_the_pmf(name):
    """χ² goodness of fit of 200 000 draws against the pmf, on bins of ≥ 20 expected draws."""
    s = sampler(name)
    pmf = s.pmf()
    assert pmf.dtype == torch.float64 and math.isclose(float(pmf.sum()), 1.0, abs_tol=1e-12)
    n = 200_000
    draws = s.sample(n, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=len(pmf)).double()
    expected = pmf * n
    order = torch.argsort(expected)  # pool the rarest timesteps until each bin expects >= 20
    bins_obs, bins_exp, acc_o, acc_e = [], [], 0.0, 0.0
    for i in order.tolist():
        acc_o, acc_e = acc_o + float(counts[i]), acc_e + float(expected[i])
        if acc_e >= 20:
            bins_obs.append(acc_o)
            bins_exp.append(acc_e)
            acc_o = acc_e = 0.0
    bins_obs[-1] += acc_o
    bins_exp[-1] += acc_e
    chi2 = sum((o - e) ** 2 / e for o, e in zip(bins_obs, bins_exp))
    p_value = stats.chi2.sf(chi2, len(bins_obs) - 1)
    assert p_value > 1e-3, (name, chi2, len(bins_obs))


def test_the_densities_match_their_definitions():
    """lognormal: EDM's ln σ ~ N(-1.2, 1.2²) ⇔ λ ~ N(2.4, 2.4²); the pmf is the mass between λ midpoints."""
    assert DEFAULTS["lognormal"] == (2.4, 2.4)
    pmf = log_snr_pmf("lognormal", LAMBDA)
    lam = LAMBDA.double()
    t = 300
    lo, hi = (lam[t + 1] + lam[t]) / 2, (lam[t] + lam[t - 1]) / 2
    exact = stats.norm.cdf(float(hi), 2.4, 2.4) - stats.norm.cdf(float(lo), 2.4, 2.4)
    assert math.isclose(float(pmf[t]), exact, rel_tol=1e-9)
    laplace = log_snr_pmf("laplace", LAMBDA, loc=0.0, scale=0.5)
    assert int(laplace.argmax()) == int((lam.abs()).argmin())  # most mass where log SNR = 0
    # the ends are open: a density centred beyond the chain puts its mass on the end step
    assert float(log_snr_pmf("laplace", LAMBDA, loc=1e6, scale=1e-3)[0]) == 1.0


@pytest.mark.parametrize("name", ["lognormal", "logistic", "laplace"])
@pytest.mark.parametrize("weighting", ["constant", "debias", "min_snr"])
def test_importance_correction_gives_the_uniform_objective_exactly(name, weighting):
    """Σ_t p(t) · w(t)/(T p(t)) · L_t = (1/T) Σ_t w(t) L_t on a fixed batch, summed over every t."""
    torch.manual_seed(0)
    schedule = Schedule.named("linear", 50)
    s = TimestepDensity(name, schedule.snr.log(), torch.device("cpu"), ONE)
    weights = weight_table(weighting, schedule.snr, "eps", config_from_dict({}).loss).double()
    x0, noise = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    out = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    per_t = torch.stack([diffusion_loss(schedule, out, x0, noise, torch.full((4,), t), "eps",
                                        torch.ones(50, dtype=torch.float64), False).loss.mean() for t in range(50)])
    uniform = (weights * per_t).mean()
    corrected = (s.pmf() * weights * s.correction().double() * per_t).sum()
    assert math.isclose(float(corrected), float(uniform), rel_tol=1e-6)
    assert not math.isclose(float((s.pmf() * weights * per_t).sum() * 50), float(uniform), rel_tol=1e-3)


def test_loss_second_moment_is_uniform_until_warm_then_proportional_to_the_rms_loss():
    T = 20
    lam = Schedule.named("linear", T).snr.log()
    s = TimestepDensity("loss_second_moment", lam, torch.device("cpu"), ONE)
    uniform = torch.full((T,), 1 / T, dtype=torch.float64)
    torch.testing.assert_close(s.pmf(), uniform)
    losses = [torch.rand(HISTORY + 5, generator=torch.Generator().manual_seed(t)) * (t + 1) for t in range(T)]
    for k in range(HISTORY + 5):
        if k == HISTORY - 1:  # every t has HISTORY - 1 losses: still warming up
            torch.testing.assert_close(s.pmf(), uniform)
        s.update(torch.arange(T), torch.stack([losses[t][k] for t in range(T)]))
    rms = torch.stack([losses[t][-HISTORY:].double().pow(2).mean().sqrt() for t in range(T)])  # the last 10 only
    expected = rms / rms.sum() * (1 - UNIFORM_MIX) + UNIFORM_MIX / T
    torch.testing.assert_close(s.pmf(), expected)
    draws = torch.bincount(s.sample(100_000, torch.Generator().manual_seed(1)), minlength=T).double() / 100_000
    torch.testing.assert_close(draws, expected, atol=5e-3, rtol=0)
    state = s.state()
    again = TimestepDensity("loss_second_moment", lam, torch.device("cpu"), ONE)
    again.load_state(state)
    torch.testing.assert_close(again.pmf(), s.pmf())


def test_loss_second_moment_history_is_guided_diffusions_for_repeated_timesteps():
    """Batches that draw one t several times: each loss enters its t's history in batch order and the
    oldest leaves first, as guided-diffusion's LossSecondMomentResampler.update_with_all_losses."""
    T, g = 20, torch.Generator().manual_seed(3)
    s = TimestepDensity("loss_second_moment", Schedule.named("linear", T).snr.log(), torch.device("cpu"), ONE)
    history = [[] for _ in range(T)]  # the original's loop, per loss
    for _ in range(12):
        t, losses = torch.randint(0, 4, (9,), generator=g), torch.rand(9, generator=g, dtype=torch.float64)
        s.update(t, losses)
        for ti, loss in zip(t.tolist(), losses.tolist()):
            history[ti] = (history[ti] + [loss])[-HISTORY:]
    assert s.counts.tolist() == [len(h) for h in history]
    for ti, h in enumerate(history):
        assert s.history[ti, :len(h)].tolist() == h


def test_uniform_draws_are_the_draws_of_before():
    """The default keeps every existing run bitwise: torch.randint on the timesteps generator."""
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sampler("uniform").sample(64, g1), torch.randint(0, 1000, (64,), generator=g2))
