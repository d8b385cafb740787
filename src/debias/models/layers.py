"""The building blocks of the ADM UNet (openai/guided-diffusion), with upstream's parameter names.

Shapes use B = batch, C = channels, H x W = spatial size, T = H * W tokens, E = the timestep-embedding
width (``4 * model_channels``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Args:
        timesteps: (B,) timesteps.
        dim: embedding width; an odd width gets a trailing zero column.
        max_period: the longest period, which sets the lowest frequency.

    Returns:
        (B, dim) float32 tensor ``[cos(t * f), sin(t * f)]`` with
        ``f = exp(-log(max_period) * arange(dim // 2) / (dim // 2))``.
    """
    half = dim // 2
    arange = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * arange / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups that computes in float32 and returns the input's dtype.

    Upstream casts every input to float32 and back. That is a no-op for float32 inputs, and for
    bfloat16 on the CPU the kernel itself accumulates in float32 (bf16 input, float32 affine), so
    only other dtypes (float16, bfloat16 off the CPU) take the cast: same numbers up to the final
    rounding to the input's dtype, without two extra passes over the activations.
    """

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, ...) -> (B, C, ...)."""
        if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type == "cpu"):
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (so a residual branch starts as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def qkv_attention(qkv: Tensor, num_heads: int, *, legacy_order: bool) -> Tensor:
    """Multi-head self-attention over packed queries, keys and values.

    Args:
        qkv: (B, 3 * num_heads * C, T). With ``legacy_order`` the channels are grouped per head
            (``[q_0, k_0, v_0, q_1, k_1, v_1, ...]``, upstream's QKVAttentionLegacy), otherwise
            q, k and v come first (``[q_0, q_1, ..., k_0, k_1, ..., v_0, v_1, ...]``, QKVAttention).
        num_heads: the number of heads.

    Returns:
        (B, num_heads * C, T), heads concatenated along channels. Scores are scaled by 1/sqrt(C).
    """
    if qkv.requires_grad and qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu":
        # torch's CPU flash-attention backward is 1.7-5x slower in bfloat16 than in float32 (T = 64..256,
        # benchmarks/BENCHMARKS.md) while its forward is faster: when training, attend in float32
        # (outside autocast) and round the output once
        with torch.autocast("cpu", enabled=False):
            return qkv_attention(qkv.float(), num_heads, legacy_order=legacy_order).to(qkv.dtype)
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy_order:
        qkv = qkv.reshape(batch, num_heads, 3, ch, length).permute(2, 0, 1, 4, 3)
    else:
        qkv = qkv.reshape(batch, 3, num_heads, ch, length).permute(1, 0, 2, 4, 3)
    # one copy to (3, B, heads, T, C): the fused (flash) kernels need a unit stride along C; with
    # transposed views SDPA falls back to the math path, which materialises the (T, T) scores
    # (about 4x slower on CPU, forward plus backward, at T = 256)
    q, k, v = qkv.contiguous().unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, C)
    return out.mT.reshape(batch, num_heads * ch, length)


def einsum_qkv_attention(qkv: Tensor, num_heads: int, *, legacy_order: bool) -> Tensor:
    """:func:`qkv_attention` in guided-diffusion's own arithmetic (``QKVAttentionLegacy`` /
    ``QKVAttention.forward``): q and k each scaled by C^(-1/4), einsum scores, softmax in float32 —
    the same math, but bit for bit what the original computes on the same machine. (B, 3·heads·C, T)
    -> (B, heads·C, T)."""
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    scale = 1 / math.sqrt(math.sqrt(ch))
    if legacy_order:
        q, k, v = qkv.reshape(batch * num_heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (part.reshape(batch * num_heads, ch, length) for part in qkv.chunk(3, dim=1))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


class Upsample(nn.Module):
    """Nearest 2x upsampling, then optionally a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv or by 2x2 average pooling.

    (B, C, H, W) -> (B, C, H/2, W/2).
    """

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling by 2x.

    Args:
        channels: input channels C.
        emb_channels: embedding width E.
        dropout: dropout rate before the last conv.
        out_channels: output channels (default C); a 1x1 conv adapts the skip path if they differ.
        use_scale_shift_norm: condition by ``norm(h) * (1 + scale) + shift`` (FiLM) instead of
            adding the embedding before the norm.
        use_checkpoint: recompute activations in the backward pass to save memory.
        resample: ``"up"`` or ``"down"`` to resize both paths by 2x (param-free), or None.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        resample: str | None = None,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.resample = {
            None: None,
            "up": nn.Upsample(scale_factor=2, mode="nearest"),
            "down": nn.AvgPool2d(2),
        }[resample]
        emb_out_channels = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """(B, C, H, W), (B, E) -> (B, out_channels, H', W') with H' = 2H, H/2 or H."""
        if self.use_checkpoint:
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample is None:
            h = self.in_layers(x)
        else:
            norm, act, conv = self.in_layers
            h = conv(self.resample(act(norm(x))))
            x = self.resample(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all spatial positions.

    Args:
        channels: channels C (split evenly among the heads).
        num_heads: number of heads, used when ``num_head_channels`` is -1.
        num_head_channels: channels per head; overrides ``num_heads`` unless -1.
        use_checkpoint: recompute activations in the backward pass to save memory.
        use_new_attention_order: split q/k/v before heads (QKVAttention) instead of heads before
            q/k/v (QKVAttentionLegacy); the two orders read the same ``qkv`` weights differently.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} channels do not split into heads of {num_head_channels}"
                )
            num_heads = channels // num_head_channels
        elif channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.legacy_order = not use_new_attention_order
        self.einsum = False  # attend with einsum_qkv_attention (the original's arithmetic) instead of SDPA
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if self.use_checkpoint:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)  # (B, C, T)
        attend = einsum_qkv_attention if self.einsum else qkv_attention
        h = attend(self.qkv(self.norm(x)), self.num_heads, legacy_order=self.legacy_order)
        return (x + self.proj_out(h)).reshape(batch, channels, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that also hands the timestep embedding (B, E) to its ResBlocks."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x
