"""weighting: learned — EDM2's uncertainty weighting: the head and its fixed point on analytic Gaussian data
(training with it: tests/test_training.py)."""

import pytest
import torch

from debias.config import ConfigError, config_from_dict
from debias.diffusion.losses import diffusion_loss
from debias.diffusion.schedule import Schedule
from debias.diffusion.uncertainty import UncertaintyHead, fixed_point
from debias.diffusion.weighting import WEIGHTINGS, WeightingParams, weight_table

SCHEDULE = Schedule.named("linear", 1000)


@pytest.mark.parametrize("base", [w for w in WEIGHTINGS if w != "learned"])
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_learned_starts_as_its_base_weighting(base, target):
    params = WeightingParams(learned_base=base)
    assert torch.equal(weight_table("learned", SCHEDULE.snr, target, params),
                       weight_table(base, SCHEDULE.snr, target, params))
    head = UncertaintyHead(generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 500, 999])
    u = head(SCHEDULE.snr.log()[t])
    assert u.shape == (4,) and torch.equal(u, torch.zeros(4))  # zero-initialised: u ≡ 0
    g = torch.Generator().manual_seed(1)
    x0, noise, out = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(3))
    w = weight_table(base, SCHEDULE.snr, target, params)
    plain = diffusion_loss(SCHEDULE, out, x0, noise, t, target, w, False)
    learned = diffusion_loss(SCHEDULE, out, x0, noise, t, target, w, False, u)
    torch.testing.assert_close(learned.loss, plain.loss, rtol=0, atol=0)


def test_the_loss_is_w_over_e_u_times_mse_plus_u():
    t, u = torch.tensor([3, 700]), torch.tensor([0.5, -1.25])
    g = torch.Generator().manual_seed(2)
    x0, noise, out = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    w = weight_table("debias", SCHEDULE.snr, "eps", WeightingParams())
    terms = diffusion_loss(SCHEDULE, out, x0, noise, t, "eps", w, False, u)
    expected = w[t].float() * terms.mse * torch.exp(-u) + u
    torch.testing.assert_close(terms.loss, expected)


@pytest.mark.parametrize("target,base", [("eps", "constant"), ("x0", "debias"), ("v", "p2")])
def test_u_converges_to_log_of_the_expected_weighted_mse(target, base):
    """On x0 ~ N(0, s² I) with the exact (MMSE) denoiser, E[MSE_ε | t] = ᾱ s² / (ᾱ s² + 1 − ᾱ), and
    MSE_x0 = MSE_ε / SNR, MSE_v = MSE_ε / ᾱ. Training the head alone on w/e^u · MSE + u drives u(t) to EDM2's
    fixed point log E[w·MSE | t]: within 0.15 for every t in the inner 96 % of the chain (measured ≤ 0.08) and
    0.05 on average (measured ≤ 0.03); the two ends, 0.2 % of the draws each, within 1 (measured ≤ 0.85)."""
    torch.manual_seed(0)
    s, batch, shape = 0.5, 512, (3, 4, 4)
    w = weight_table(base, SCHEDULE.snr, target, WeightingParams())
    head = UncertaintyHead(generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k < 1000 else 0.2)
    g = torch.Generator().manual_seed(1)
    for _ in range(1600):
        t = torch.randint(0, 1000, (batch,), generator=g)
        x0, noise = s * torch.randn(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g)
        alpha, sigma = SCHEDULE.gather(SCHEDULE.alpha, t, x0), SCHEDULE.gather(SCHEDULE.sigma, t, x0)
        xt = alpha * x0 + sigma * noise
        eps = sigma * xt / (alpha**2 * s**2 + sigma**2)
        x0_hat = (xt - sigma * eps) / alpha
        pred = {"eps": eps, "x0": x0_hat, "v": alpha * eps - sigma * x0_hat}[target]
        loss = diffusion_loss(SCHEDULE, pred.float(), x0, noise, t, target, w, False, head(SCHEDULE.snr.log()[t]))
        opt.zero_grad()
        loss.loss.mean().backward()
        opt.step()
        decay.step()
    abar = SCHEDULE.alphas_cumprod
    mse_eps = abar * s**2 / (abar * s**2 + 1 - abar)
    mse = mse_eps * {"eps": 1.0, "x0": 1 / SCHEDULE.snr, "v": 1 / abar}[target]
    with torch.no_grad():
        error = (head(SCHEDULE.snr.log()).double() - fixed_point(w * mse)).abs()
    assert error[20:980].max() <= 0.15 and error.mean() <= 0.05 and error.max() <= 1.0, error.max()


@pytest.mark.parametrize("base", ["learned", "nope"])
def test_learned_base_must_be_a_fixed_weighting(base):
    with pytest.raises(ConfigError, match="loss.learned_base"):
        config_from_dict({}, ["weighting=learned", f"loss.learned_base={base}"])
