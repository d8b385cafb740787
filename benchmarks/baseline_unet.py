"""The ORIGINAL implementation's hot path, rebuilt on our UNet — for side-by-side benchmarks only.

    from baseline_unet import make_baseline
    original = make_baseline(UNetModel(**kwargs))   # same module, same weights, upstream's code paths

The reference code base (openai/guided-diffusion, which the Debias paper's code forks) differs from
``debias.models.layers`` in how it computes, not in what it computes; this module swaps those code
paths back in, in place, so that "original vs ours" can be timed in one process on identical
weights (``state_dict`` names and shapes are unchanged):

- ``AttentionBlock.forward`` is upstream's ``checkpoint(self._forward, (x,), self.parameters(), True)``
  (guided_diffusion/unet.py, class AttentionBlock): gradient checkpointing is FORCED in every
  attention block whatever ``use_checkpoint`` says, so the backward pass re-runs each block's forward.
  The checkpoint is upstream's ``CheckpointFunction`` (guided_diffusion/nn.py, ``checkpoint``), copied
  below: forward under ``no_grad``, recompute under ``enable_grad`` and ``autograd.grad`` w.r.t. the
  inputs and parameters in backward.
- Attention is upstream's ``QKVAttentionLegacy`` / ``QKVAttention`` (guided_diffusion/unet.py):
  two einsums with q and k each pre-scaled by C^(-1/4) and the softmax taken in float32, instead of
  ``F.scaled_dot_product_attention``.
- ``GroupNorm32`` is upstream's (guided_diffusion/nn.py): ``super().forward(x.float()).type(x.dtype)``,
  i.e. always normalising in float32 with a cast in and a cast out.

Everything else (ResBlocks, resampling, timestep embedding, the torso's dtype handling) already
follows upstream line by line in :mod:`debias.models.layers`.

:class:`UpstreamTrainer` is our :class:`~debias.train.loop.Trainer` with its ``step`` replaced by
upstream's ``TrainLoop.run_step`` (guided_diffusion/train_util.py, fp16_util.py, nn.py, resample.py),
for the training benchmark: ``UniformSampler`` timesteps drawn with numpy; ``log_loss_dict``
(``.item()`` of every loss term and a Python loop over the batch for the quartile logs);
``MixedPrecisionTrainer`` without fp16 (grads zeroed in place, ``_compute_norms`` with two
``.item()`` per parameter); ``torch.optim.AdamW`` with its defaults (the per-parameter loop on CPU);
``update_ema``'s per-parameter loop. The loss is ours (``diffusion_loss``, golden-tested against
upstream's ``training_losses``), gradients are not clipped (upstream does not clip).

:func:`upstream_ddim` is upstream's DDIM loop (guided_diffusion/gaussian_diffusion.py,
``ddim_sample_loop`` / ``ddim_sample``) for the sampling benchmark: under ``no_grad`` every step takes
the full ``p_mean_variance`` (posterior mean and learned-range variance included, which DDIM then
discards), re-derives ε̂ from x̂0, and draws ``randn_like`` noise even for η = 0.
Nothing in the library imports this file.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from torch import Tensor, nn

from debias.diffusion.losses import diffusion_loss
from debias.diffusion.reverse import p_mean_variance
from debias.diffusion.schedule import Schedule
from debias.models.layers import AttentionBlock, GroupNorm32
from debias.solvers.timesteps import select_timesteps
from debias.train.loop import Trainer


class CheckpointFunction(torch.autograd.Function):
    """guided_diffusion/nn.py ``CheckpointFunction``, verbatim up to names."""

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with torch.no_grad():
            output_tensors = ctx.run_function(*ctx.input_tensors)
        return output_tensors

    @staticmethod
    def backward(ctx, *output_grads):
        ctx.input_tensors = [x.detach().requires_grad_(True) for x in ctx.input_tensors]
        with torch.enable_grad():
            # shallow copies, so that in-place ops in run_function cannot touch the saved tensors
            shallow_copies = [x.view_as(x) for x in ctx.input_tensors]
            output_tensors = ctx.run_function(*shallow_copies)
        input_grads = torch.autograd.grad(output_tensors, ctx.input_tensors + ctx.input_params, output_grads,
                                          allow_unused=True)
        del ctx.input_tensors
        del ctx.input_params
        del output_tensors
        return (None, None) + input_grads


def checkpoint(func, inputs, params, flag: bool):
    """guided_diffusion/nn.py ``checkpoint``: recompute ``func(*inputs)`` in backward when ``flag``."""
    if flag:
        args = tuple(inputs) + tuple(params)
        return CheckpointFunction.apply(func, len(inputs), *args)
    return func(*inputs)


def qkv_attention_legacy(qkv: Tensor, n_heads: int) -> Tensor:
    """guided_diffusion/unet.py ``QKVAttentionLegacy.forward``: (B, 3·H·C, T) -> (B, H·C, T)."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # more stable with f16 than dividing afterwards
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v)
    return a.reshape(bs, -1, length)


def qkv_attention_new(qkv: Tensor, n_heads: int) -> Tensor:
    """guided_diffusion/unet.py ``QKVAttention.forward`` (split q, k, v before heads)."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", (q * scale).view(bs * n_heads, ch, length),
                          (k * scale).view(bs * n_heads, ch, length))
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * n_heads, ch, length))
    return a.reshape(bs, -1, length)


class UpstreamGroupNorm32(GroupNorm32):
    """guided_diffusion/nn.py ``GroupNorm32``: always float32 inside, cast back to the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.GroupNorm.forward(self, x.float()).type(x.dtype)


class UpstreamAttentionBlock(AttentionBlock):
    """guided_diffusion/unet.py ``AttentionBlock``: forced checkpointing and einsum attention."""

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint(self._upstream_forward, (x,), self.parameters(), True)

    def _upstream_forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        attention = qkv_attention_legacy if self.legacy_order else qkv_attention_new
        h = attention(qkv, self.num_heads)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


def make_baseline(model: nn.Module) -> nn.Module:
    """Switch ``model`` (a :class:`~debias.models.unet.UNetModel`) to upstream's code paths, in place.

    Only classes change (no parameter, buffer or name does), so the same weights, optimizer and
    EMA keep working. Returns ``model``.
    """
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.__class__ = UpstreamAttentionBlock
        elif isinstance(module, GroupNorm32):
            module.__class__ = UpstreamGroupNorm32
    return model


@torch.no_grad()
def upstream_ddim(model: nn.Module, shape: tuple[int, ...], steps: int, schedule: Schedule, learn_sigma: bool,
                  eta: float = 0.0) -> Tensor:
    """guided-diffusion's ``ddim_sample_loop`` for an ε-prediction model on the chain respaced to
    ``steps`` evenly spaced timesteps ("ddimN" respacing); x_T ~ N(0, I) of ``shape``; returns x0."""
    device = next(model.parameters()).device
    chain = schedule.respace(select_timesteps(schedule.num_timesteps, steps, "even"))
    timestep_map = chain.timestep_map.to(device)
    sqrt_recip_alphas_cumprod = (1 / chain.alphas_cumprod).sqrt()
    sqrt_recipm1_alphas_cumprod = (1 / chain.alphas_cumprod - 1).sqrt()
    x = torch.randn(*shape, device=device)
    for i in reversed(range(chain.num_timesteps)):
        t = torch.tensor([i] * shape[0], device=device)
        out = p_mean_variance(chain, model(x, timestep_map[t]), x, t, "eps", learn_sigma, True)
        eps = (chain.gather(sqrt_recip_alphas_cumprod, t, x) * x - out.pred_x0) \
            / chain.gather(sqrt_recipm1_alphas_cumprod, t, x)
        alpha_bar = chain.gather(chain.alphas_cumprod, t, x)
        alpha_bar_prev = chain.gather(chain.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn_like(x)
        mean_pred = out.pred_x0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        x = mean_pred + nonzero_mask * sigma * noise
    return x


class UpstreamTrainer(Trainer):
    """Our Trainer (data, schedule, loss weights, model) stepping as guided-diffusion's ``TrainLoop``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        tc = self.cfg.train
        self.params = list(self.network.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.ema_rates = [float(rate) for rate in tc.ema_rates]
        self.ema_params = [[p.detach().clone() for p in self.params] for _ in self.ema_rates]
        self.logged: dict[str, tuple[float, int]] = defaultdict(lambda: (0.0, 0))

    def logkv_mean(self, key: str, value: float) -> None:
        """guided_diffusion/logger.py ``Logger.logkv_mean``: a running mean per key."""
        old, count = self.logged[key]
        self.logged[key] = (old * count / (count + 1) + value / (count + 1), count + 1)

    def step(self, k: int) -> None:
        """``run_step``: forward_backward, optimize (norms, AdamW), update_ema; one microbatch."""
        for p in self.params:  # fp16_util.zero_grad
            if p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()
        x0, y = self.batch(k)
        noise = torch.randn(x0.shape, generator=self.generators["noise"], device=self.device)
        size = self.schedule.num_timesteps  # resample.UniformSampler.sample
        probs = np.ones(size) / size
        t_np = np.random.choice(size, size=(len(x0),), p=probs)
        t = torch.from_numpy(t_np).long().to(self.device)
        weights = torch.from_numpy(1 / (size * probs[t_np])).float().to(self.device)
        out = self.model(self.schedule.q_sample(x0, t, noise), t, y)
        terms = diffusion_loss(self.schedule, out, x0, noise, t, self.cfg.target, self.objective.weight_table,
                               self.cfg.model.learn_sigma)
        losses = {"loss": terms.loss, "mse": terms.mse, "vb": terms.vb}
        loss = (losses["loss"] * weights).mean()
        for key, values in {key: value * weights for key, value in losses.items()}.items():  # log_loss_dict
            self.logkv_mean(key, values.mean().item())
            for sub_t, sub_loss in zip(t.cpu().numpy(), values.detach().cpu().numpy()):
                self.logkv_mean(f"{key}_q{int(4 * sub_t / size)}", sub_loss)
        loss.backward()
        grad_norm = param_norm = 0.0  # MixedPrecisionTrainer._compute_norms
        for p in self.params:
            with torch.no_grad():
                param_norm += torch.norm(p, p=2, dtype=torch.float32).item() ** 2
                if p.grad is not None:
                    grad_norm += torch.norm(p.grad, p=2, dtype=torch.float32).item() ** 2
        self.logkv_mean("grad_norm", np.sqrt(grad_norm))
        self.logkv_mean("param_norm", np.sqrt(param_norm))
        self.optimizer.step()
        for rate, ema in zip(self.ema_rates, self.ema_params):  # nn.update_ema
            for target, source in zip(ema, self.params):
                target.detach().mul_(rate).add_(source, alpha=1 - rate)
        self.logged["step"] = (float(k), 1)  # log_step
