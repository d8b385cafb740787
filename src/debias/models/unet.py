"""The ADM UNet of openai/guided-diffusion ("Diffusion Models Beat GANs on Image Synthesis").

A clean re-implementation whose ``state_dict()`` has exactly upstream's parameter names and
shapes, so guided-diffusion checkpoints (and the Debias paper's, which use the same code) load
with ``strict=True`` and give the same outputs. Only 2-D images are supported. The blocks are in
:mod:`debias.models.layers`; building the keyword arguments from params is
:mod:`debias.models.factory`'s job, from guided-diffusion's flags :mod:`debias.convert`'s.

Shapes below use B = batch, C = channels, H x W = spatial size, E = ``4 * model_channels``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor, nn

from debias.models.layers import (AttentionBlock, Downsample, GroupNorm32, ResBlock, TimestepEmbedSequential, Upsample,
                                  timestep_embedding, zero_module)

ATTENTION = ("sdpa", "einsum")  # how AttentionBlocks compute (UNetModel.set_attention)

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

    def set_attention(self, kind: str) -> None:
        """Attend with ``sdpa`` (fused scaled_dot_product_attention, the default) or ``einsum`` (the
        original's arithmetic: slower, and bit for bit guided-diffusion on the same machine)."""
        if kind not in ATTENTION:
            raise ValueError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTION)}")
        for module in self.modules():
            if isinstance(module, AttentionBlock):
                module.einsum = kind == "einsum"

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
