"""Build the UNet for a config, or rebuild it from a checkpoint."""

from __future__ import annotations

import torch

from debias.checkpoints import Checkpoint, load_weights
from debias.config import Config, ConfigError
from debias.errors import DebiasError
from debias.models.unet import UNetModel, build_unet_kwargs


def unet_kwargs_for(cfg: Config, num_classes: int | None) -> dict:
    """The exact ``UNetModel`` keyword arguments for a config (stored in every checkpoint)."""
    m = cfg.model
    try:
        kwargs = build_unet_kwargs(
            image_size=cfg.data.image_size, channels=cfg.data.channels, model_channels=m.model_channels,
            channel_mult=m.channel_mult, num_res_blocks=m.num_res_blocks, attention_resolutions=m.attention_resolutions,
            num_head_channels=m.num_head_channels, dropout=m.dropout, learn_sigma=m.learn_sigma,
            num_classes=num_classes if cfg.data.class_cond else None, use_scale_shift_norm=m.use_scale_shift_norm,
            resblock_updown=m.resblock_updown, use_checkpoint=m.use_checkpoint,
            use_new_attention_order=m.use_new_attention_order)
        with torch.device("meta"):
            UNetModel(**kwargs)  # the constructor's own checks (e.g. heads) without allocating any weight
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    return kwargs


def model_from_checkpoint(ckpt: Checkpoint, ema: bool = True, source: str = "checkpoint") -> UNetModel:
    """The checkpoint's UNet in eval mode, with its first EMA's weights when ``ema``."""
    try:
        model = UNetModel(**ckpt.unet_kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError, MemoryError) as err:  # a foreign or hostile file's arguments
        raise DebiasError(f"{source}: the stored model arguments do not build a UNet ({err})") from None
    load_weights(model, ckpt.weights(ema), source)
    return model.eval().requires_grad_(False)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
