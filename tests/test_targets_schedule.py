"""Target conversions round-trip; schedule properties for any T."""

import pytest
import torch

from debias.diffusion import targets
from debias.diffusion.schedule import Schedule, make_betas


@pytest.mark.parametrize("target", targets.TARGETS)
def test_conversions_round_trip(target):
    gen = torch.Generator().manual_seed(1)
    s = Schedule.named("cosine", 100)
    t = torch.tensor([0, 10, 50, 99])
    x0 = torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64)
    xt = s.q_sample(x0, t, eps)
    a, sg = s.gather(s.alpha, t, x0), s.gather(s.sigma, t, x0)
    pred = targets.target_from(target, x0, eps, a, sg)
    torch.testing.assert_close(targets.x0_from(target, pred, xt, a, sg), x0)
    torch.testing.assert_close(targets.eps_from(target, pred, xt, a, sg), eps)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [20, 1000, 4000])
def test_schedule_properties(name, steps):
    s = Schedule.named(name, steps)
    assert s.betas.dtype == torch.float64 and len(s.betas) == steps
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())
    torch.testing.assert_close(s.alpha ** 2 + s.sigma ** 2, torch.ones(steps, dtype=torch.float64))
    assert float(s.alphas_cumprod[-1]) < 0.05


def test_bad_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError):
        Schedule.named("linear", 1000).respace([2000])
