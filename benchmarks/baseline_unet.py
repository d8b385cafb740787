"""The ORIGINAL implementation's hot path, rebuilt on our UNet — for side-by-side benchmarks only.

    from baseline_unet import make_baseline
    original = make_baseline(UNetModel(**kwargs))   # same module, same weights, upstream's code paths

The reference code base (openai/guided-diffusion, which the Debias paper's code forks) differs from
``debias.models.unet`` in how it computes, not in what it computes; this module swaps those code
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
follows upstream line by line in :mod:`debias.models.unet`. Nothing in the library imports this file.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from debias.models.unet import AttentionBlock, GroupNorm32


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
