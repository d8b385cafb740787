"""Schedules, losses and the reverse step reproduce the original implementation's numbers."""

import pytest
import torch

from debias.diffusion.losses import diffusion_loss
from debias.diffusion.reverse import p_mean_variance
from debias.diffusion.schedule import Schedule, space_timesteps
from debias.diffusion.weighting import WeightingParams, eps_weight, weight_table

TABLES = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
          "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]
TARGETS = ["eps", "x0", "v"]


def schedule_of(golden) -> Schedule:
    return Schedule.named(golden["schedule"], golden["steps"])


def assert_close64(actual, expected, rtol=1e-10, atol=0.0):
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_close32(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("table", TABLES)
def test_schedule_tables(golden, table):
    assert_close64(getattr(schedule_of(golden), table), golden[table])


def test_snr_table(golden):
    # The upstream SNR at the very last cosine step (SNR ≈ 2.4e-9) took another float64 path:
    # the tables agree to 1e-10 relative everywhere but differ there by 6e-17 absolute.
    assert_close64(schedule_of(golden).snr, golden["snr"], rtol=1e-10, atol=1e-16)


def test_q_sample(golden):
    xt = schedule_of(golden).q_sample(golden["x0"], golden["t"], golden["noise"])
    assert_close32(xt, golden["x_t"])


@pytest.mark.parametrize("name,key,params", [
    ("debias", "debias", WeightingParams()),
    ("p2", "p2_gamma1_k1", WeightingParams(p2_gamma=1.0, p2_k=1.0)),
    ("p2", "p2_gamma0.5_k1", WeightingParams(p2_gamma=0.5, p2_k=1.0)),
    ("min_snr", "min_snr5", WeightingParams(min_snr_gamma=5.0)),
    ("snr", "snr", WeightingParams()),
])
def test_weight_tables(golden, name, key, params):
    assert_close64(eps_weight(name, golden["snr"], params), golden[f"weight/{key}"])
    # and from our own schedule (see test_snr_table for the one last-step difference)
    torch.testing.assert_close(eps_weight(name, schedule_of(golden).snr, params), golden[f"weight/{key}"],
                               rtol=1e-7, atol=0)


@pytest.mark.parametrize("target", TARGETS)
def test_loss_terms(golden, target):
    s = schedule_of(golden)
    terms = diffusion_loss(s, golden["model_output"], golden["x0"], golden["noise"], golden["t"], target,
                           weight_table("constant", s.snr, target), learn_sigma=True)
    assert_close32(terms.mse, golden[f"{target}/mse_unweighted"])
    torch.testing.assert_close(terms.vb, golden[f"{target}/vb"], rtol=1e-5, atol=1e-5)
    assert_close32(terms.loss, terms.mse + terms.vb)


def test_debias_weighted_mse(golden):
    s = schedule_of(golden)
    terms = diffusion_loss(s, golden["model_output"], golden["x0"], golden["noise"], golden["t"], "eps",
                           weight_table("debias", s.snr, "eps"), learn_sigma=True)
    assert_close32(terms.loss - terms.vb, golden["eps/mse_debias"])


@pytest.mark.parametrize("target", TARGETS)
def test_reverse_step(golden, target):
    step = p_mean_variance(schedule_of(golden), golden["model_output"], golden["x_t"], golden["t"], target,
                           learn_sigma=True, clip_x0=True)
    assert_close32(step.mean, golden[f"{target}/p_mean"])
    assert_close32(step.log_variance, golden[f"{target}/p_log_variance"])
    assert_close32(step.pred_x0, golden[f"{target}/pred_xstart"])


def test_respacing():
    golden = torch.load("tests/fixtures/diffusion_linear_1000_respaced50.pt", weights_only=True)
    kept = space_timesteps(1000, golden["respaced/spec"])
    assert kept == golden["respaced/timestep_map"].tolist()
    chain = schedule_of(golden).respace(kept)
    assert_close64(chain.betas, golden["respaced/betas"])
    assert chain.timestep_map.tolist() == kept
    for target in TARGETS:
        t = golden[f"respaced/{target}/t"]
        xt = chain.q_sample(golden["x0"], t, golden["noise"])
        step = p_mean_variance(chain, golden["model_output"], xt, t, target, learn_sigma=True, clip_x0=True)
        assert_close32(step.mean, golden[f"respaced/{target}/p_mean"])
        assert_close32(step.log_variance, golden[f"respaced/{target}/p_log_variance"])


def test_space_timesteps_variants():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "10,5") == sorted({*[round(i * 49 / 9) for i in range(10)],
                                                    *[50 + round(i * 49 / 4) for i in range(5)]})
    assert space_timesteps(10, "10") == list(range(10))
    with pytest.raises(ValueError):
        space_timesteps(10, "11")
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")
