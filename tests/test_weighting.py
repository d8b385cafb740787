"""Weightings: closed forms, target-space conversion (autograd check), normalization."""

import math

import pytest
import torch

from debias.diffusion import targets
from debias.diffusion.schedule import Schedule
from debias.diffusion.weighting import (WEIGHTINGS, WeightingParams, eps_weight, weight_table, target_weight)

SNR = torch.tensor([1e-4, 0.03, 0.5, 1.0, 3.0, 25.0, 1e4], dtype=torch.float64)
P = WeightingParams(p2_gamma=0.5, p2_k=1.0, min_snr_gamma=5.0, sigmoid_bias=1.5, edm_sigma_data=0.5,
                    learned_base="debias")

CLOSED_FORMS = {
    "constant": lambda s: 1.0,
    "p2": lambda s: (1.0 + s) ** -0.5,
    "min_snr": lambda s: min(1.0, 5.0 / s),
    "snr": lambda s: 1.0 / s,
    "debias": lambda s: s ** -0.5,
    "max_snr": lambda s: max(1.0, 1.0 / s),
    "sigmoid": lambda s: 1.0 / (1.0 + math.exp(-(1.5 - math.log(s)))),
    "edm": lambda s: ((1 / s) + 0.25) / ((1 / s) * 0.25) / s,
    "learned": lambda s: s ** -0.5,  # its base (here debias); the learned 1/e^u is applied in the loss
}


def test_registry_is_complete():
    assert set(CLOSED_FORMS) == set(WEIGHTINGS)


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_closed_form(name):
    expected = torch.tensor([CLOSED_FORMS[name](float(s)) for s in SNR], dtype=torch.float64)
    torch.testing.assert_close(eps_weight(name, SNR, P), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", [n for n in WEIGHTINGS if n != "constant"])
@pytest.mark.parametrize("target", ["x0", "v"])
def test_target_space_weight_gives_the_eps_space_gradient(name, target):
    """w_target·‖target − pred‖² has the same gradient w.r.t. the implied ε̂ as w·‖ε − ε̂‖²."""
    gen = torch.Generator().manual_seed(0)
    snr = SNR[1:-1]
    alpha = (snr / (1 + snr)).sqrt().view(-1, 1)
    sigma = (1 / (1 + snr)).sqrt().view(-1, 1)
    x0 = torch.randn(len(snr), 16, generator=gen, dtype=torch.float64)
    eps = torch.randn(len(snr), 16, generator=gen, dtype=torch.float64)
    xt = alpha * x0 + sigma * eps
    eps_hat = torch.randn(len(snr), 16, generator=gen, dtype=torch.float64, requires_grad=True)

    w_eps = eps_weight(name, snr, P).view(-1, 1)
    (grad_eps,) = torch.autograd.grad((w_eps * (eps - eps_hat) ** 2).sum(), eps_hat)

    pred = targets.target_from(target, targets.x0_from("eps", eps_hat, xt, alpha, sigma), eps_hat, alpha, sigma)
    truth = targets.target_from(target, x0, eps, alpha, sigma)
    w_t = target_weight(name, snr, target, P).view(-1, 1)
    (grad_t,) = torch.autograd.grad((w_t * (truth - pred) ** 2).sum(), eps_hat)
    torch.testing.assert_close(grad_t, grad_eps, rtol=1e-9, atol=1e-12)


def test_constant_is_unit_weight_in_every_space():
    for target in ("eps", "x0", "v"):
        assert torch.equal(target_weight("constant", SNR, target), torch.ones_like(SNR))
        assert torch.equal(target_weight("learned", SNR, target), torch.ones_like(SNR))  # on its default base


def test_snr_weighting_is_plain_x0_mse():
    torch.testing.assert_close(target_weight("snr", SNR, "x0"), torch.ones_like(SNR))


def test_debias_mean_on_linear_schedule_and_normalization():
    snr = Schedule.named("linear", 1000).snr
    w = weight_table("debias", snr, "eps")
    assert 17.7 < float(w.mean()) < 17.9  # the paper's weights are not normalized
    wn = weight_table("debias", snr, "eps", WeightingParams(normalize=True))
    assert abs(float(wn.mean()) - 1.0) < 1e-12
    torch.testing.assert_close(wn / wn[0], w / w[0])


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown weighting 'nope'"):
        eps_weight("nope", SNR)
    with pytest.raises(ValueError, match="unknown target"):
        target_weight("debias", SNR, "score")
