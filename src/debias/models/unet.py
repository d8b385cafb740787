"""The ADM UNet of openai/guided-diffusion ("Diffusion Models Beat GANs on Image Synthesis").

A clean re-implementation whose ``state_dict()`` has exactly upstream's parameter names and
shapes, so guided-diffusion checkpoints (and the Debias paper's, which use the same code) load
with ``strict=True`` and give the same outputs. Only 2-D images are supported.

Shapes below use B = batch, C = channels, H x W = spatial size, T = H * W tokens,
E = ``4 * model_channels`` (the timestep-embedding width).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# guided-diffusion's create_model defaults, plus the two sizes below 32 chosen here.
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
    8: (1, 2),
}


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
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, legacy_order=self.legacy_order)
        return (x + self.proj_out(h)).reshape(batch, channels, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that also hands the timestep embedding (B, E) to its ResBlocks."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """The ADM UNet with timestep (and optional class) conditioning; guided-diffusion's arguments.

    Args:
        image_size: the training image size (kept for reference; any size divisible by
            ``2 ** (len(channel_mult) - 1)`` works).
        in_channels: input image channels.
        model_channels: base width; level i has ``int(channel_mult[i] * model_channels)`` channels
            (all widths must be multiples of 32 for the GroupNorms).
        out_channels: output channels (e.g. ``2 * in_channels`` with learned variance).
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: downsample RATES (1, 2, 4, ...) at which attention follows each
            ResBlock; the middle block always has attention.
        dropout: dropout rate inside the ResBlocks.
        channel_mult: width multiplier per level; the UNet has ``len(channel_mult)`` levels.
        conv_resample: resample with learned convs (else nearest / average pooling).
        dims: must be 2.
        num_classes: number of classes for a class-conditional model, or None.
        use_checkpoint: gradient checkpointing in every ResBlock and AttentionBlock.
        use_fp16: run the torso (input, middle and output blocks) in float16; its convs are
            converted at construction (GroupNorms still compute in float32).
        num_heads: attention heads (when ``num_head_channels`` is -1).
        num_head_channels: channels per attention head, overriding ``num_heads`` unless -1.
        num_heads_upsample: heads in the decoder's attention; -1 means ``num_heads``.
        use_scale_shift_norm: FiLM conditioning in the ResBlocks.
        resblock_updown: resample with ResBlocks instead of Downsample / Upsample layers.
        use_new_attention_order: split q/k/v before heads (see :class:`AttentionBlock`).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Collection[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if dims != 2:
            raise ValueError(f"only 2-D images are supported, got dims={dims}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.dtype = torch.float32

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res_block(channels: int, out: int | None = None, resample: str | None = None):
            return ResBlock(
                channels, emb_dim, dropout, out, use_scale_shift_norm, use_checkpoint, resample
            )

        def attention(channels: int, heads: int):
            return AttentionBlock(
                channels, heads, num_head_channels, use_checkpoint, use_new_attention_order
            )

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                if resblock_updown:
                    down: nn.Module = res_block(ch, resample="down")
                else:
                    down = Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch), attention(ch, num_heads), res_block(ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(res_block(ch, resample="up"))
                    else:
                        layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1))
        )
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """Convert the torso's convolutions to float16 (upstream's convert_to_fp16)."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in blocks.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                    module.half()
        self.dtype = torch.float16

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict from noisy images.

        Args:
            x: (B, in_channels, H, W) images (any memory format).
            t: (B,) timesteps (integer or fractional).
            y: (B,) int64 class labels, required iff the model is class-conditional.

        Returns:
            (B, out_channels, H, W) in the dtype of ``x``.
        """
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass labels y if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        h = x.type(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def build_unet_kwargs(
    image_size: int,
    channels: int,
    model_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attention_resolutions: Sequence[int] = (),
    num_head_channels: int = -1,
    dropout: float = 0.0,
    learn_sigma: bool = False,
    num_classes: int | None = None,
    use_scale_shift_norm: bool = False,
    resblock_updown: bool = False,
    use_checkpoint: bool = False,
    use_new_attention_order: bool = False,
) -> dict:
    """:class:`UNetModel` keyword arguments with attention given at RESOLUTIONS (e.g. ``[16]`` = at 16x16).

    Args:
        image_size: image side; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        channels: image channels (1 for grey, 3 for RGB).
        model_channels, channel_mult, num_res_blocks, dropout, num_classes, use_scale_shift_norm,
        resblock_updown, use_checkpoint, use_new_attention_order: as in :class:`UNetModel`.
        attention_resolutions: feature-map sides at which to add attention; each must be one of
            the UNet's level sizes ``image_size // 2 ** level``.
        num_head_channels: channels per attention head; -1 means a single head.
        learn_sigma: output ``2 * channels`` (mean and variance interpolation), not ``channels``.

    Raises:
        ValueError: for an image size the levels cannot halve, or a resolution no level has.
    """
    levels = len(channel_mult)
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"image size {image_size} cannot be halved {levels - 1} times")
    level_sizes = [image_size // 2**level for level in range(levels)]
    for res in attention_resolutions:
        if res not in level_sizes:
            raise ValueError(
                f"attention resolution {res} never occurs in this UNet "
                f"(its feature maps are {level_sizes})"
            )
    return dict(
        image_size=image_size,
        in_channels=channels,
        model_channels=model_channels,
        out_channels=channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(image_size // res for res in attention_resolutions),
        dropout=dropout,
        channel_mult=tuple(channel_mult),
        num_classes=num_classes,
        use_checkpoint=use_checkpoint,
        num_head_channels=num_head_channels,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def build_unet(**kwargs) -> UNetModel:
    """``UNetModel(**build_unet_kwargs(**kwargs))``: the friendlier constructor from the ``model`` params."""
    return UNetModel(**build_unet_kwargs(**kwargs))


# guided-diffusion's model_and_diffusion_defaults() (the values its scripts start from), plus the
# Debias fork's num_classes flag and an in_channels override.
_FLAG_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "num_classes": 1000,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
    "in_channels": 3,
}


def flag_bool(value: Any) -> bool:
    """guided-diffusion's str2bool."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"expected a boolean flag, got {value!r}")


def _flag_numbers(value: Any) -> tuple[float, ...]:
    """``"1,2,2"``, ``16`` or ``[1, 2]`` -> a tuple of ints (floats where not integral: 0.5)."""
    if isinstance(value, str):
        items = value.split(",")
    else:
        items = value if isinstance(value, Sequence) else [value]
    numbers = tuple(float(item) for item in items)
    return tuple(int(n) if n.is_integer() else n for n in numbers)


def unet_kwargs_from_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Turn guided-diffusion script flags into :class:`UNetModel` kwargs, as ``create_model`` does.

    Missing flags take guided-diffusion's script defaults (``model_and_diffusion_defaults``);
    values may be command-line strings (``"True"``, ``"16"``, ``"32,16,8"``). Flags that do not
    concern the model (``diffusion_steps``, ``noise_schedule``, ...) are ignored.
    ``attention_resolutions`` are resolutions, converted to rates ``image_size // res`` without
    validation (as upstream); ``channel_mult`` ``""`` picks the default for the image size.
    ``in_channels`` (default 3) also sets ``out_channels`` (doubled with ``learn_sigma``).
    """
    f = {**_FLAG_DEFAULTS, **flags}
    image_size = int(f["image_size"])
    if f["channel_mult"] in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image size {image_size}; pass channel_mult"
            )
        channel_mult = DEFAULT_CHANNEL_MULT[image_size]
    else:
        channel_mult = _flag_numbers(f["channel_mult"])
    in_channels = int(f["in_channels"])
    resolutions = _flag_numbers(f["attention_resolutions"])
    return {
        "image_size": image_size,
        "in_channels": in_channels,
        "model_channels": int(f["num_channels"]),
        "out_channels": in_channels * (2 if flag_bool(f["learn_sigma"]) else 1),
        "num_res_blocks": int(f["num_res_blocks"]),
        "attention_resolutions": tuple(image_size // int(res) for res in resolutions),
        "dropout": float(f["dropout"]),
        "channel_mult": channel_mult,
        "num_classes": int(f["num_classes"]) if flag_bool(f["class_cond"]) else None,
        "use_checkpoint": flag_bool(f["use_checkpoint"]),
        "use_fp16": flag_bool(f["use_fp16"]),
        "num_heads": int(f["num_heads"]),
        "num_head_channels": int(f["num_head_channels"]),
        "num_heads_upsample": int(f["num_heads_upsample"]),
        "use_scale_shift_norm": flag_bool(f["use_scale_shift_norm"]),
        "resblock_updown": flag_bool(f["resblock_updown"]),
        "use_new_attention_order": flag_bool(f["use_new_attention_order"]),
    }
