"""EDM2's learned loss weighting: a small head u(λ) of the log-SNR λ, trained with the network.

Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models", §5, "Loss
weighting") treat the loss at each noise level as a Gaussian likelihood with a learned variance e^u:

    L = E_t[ w(t)/e^{u(t)} · ‖target − prediction‖² + u(t) ],

whose minimum over u at fixed network is u(t) = log E[w(t)·MSE | t]: each noise level's loss is brought
to unit scale as training goes, on top of the base weighting w (``loss.learned_base``).

The head is EDM2's: Fourier features cos(2π(f·c + φ))·√2 of c = −λ/8 (EDM2's c_noise = ln σ/4 with
σ = e^{−λ/2}), fixed random f ~ N(0, 1) and φ ~ U[0, 1) (128 of them), and a linear layer to one value.
The layer starts at zero, so training starts on the base weighting (u ≡ 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

CHANNELS = 128  # EDM2's logvar_channels


class UncertaintyHead(nn.Module):
    """u(λ): the learned log-variance of the loss at log-SNR λ."""

    def __init__(self, channels: int = CHANNELS, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=generator))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=generator))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, log_snr: Tensor) -> Tensor:
        """(B,) log-SNR → (B,) float32 u."""
        c = -log_snr.float() / 8
        features = torch.cos(c[:, None] * self.freqs + self.phases) * math.sqrt(2)
        return self.linear(features).squeeze(-1)


def fixed_point(weighted_mse: Tensor) -> Tensor:
    """The u that minimises E[w·MSE/e^u + u] at each t: log E[w·MSE | t], from (T,) means E[w·MSE | t]."""
    return weighted_mse.log()


class WithUncertainty(nn.Module):
    """The network and, for ``weighting: learned``, the head u(λ_t): one module, so that DDP averages the
    head's gradients with the network's. ``forward(x, t, y)`` → (network output, u (B,) float32 or None)."""

    def __init__(self, network: nn.Module, head: UncertaintyHead | None, log_snr: Tensor):
        super().__init__()
        self.network, self.head = network, head
        self.register_buffer("log_snr", log_snr, persistent=False)  # (T,) λ of the chain's timesteps

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        out = self.network(x, t, y)
        if self.head is None:
            return out, None
        with torch.autocast(x.device.type, enabled=False):  # u in float32 whatever the network's precision
            return out, self.head(self.log_snr[t])
