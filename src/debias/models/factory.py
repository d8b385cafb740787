"""Build the UNet for a config, or load a trained one with the diffusion it was trained for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from debias.checkpoints import Checkpoint, load_checkpoint, load_weights
from debias.config import Config, ConfigError, ModelConfig
from debias.diffusion.schedule import Schedule
from debias.diffusion.targets import check_target
from debias.errors import DebiasError
from debias.models.unet import UNetModel


def unet_kwargs(model: ModelConfig, image_size: int, channels: int, num_classes: int | None) -> dict:
    """The exact :class:`UNetModel` keyword arguments for the ``model`` params (stored in every checkpoint).

    ``model.attention_resolutions`` are feature-map SIDES (e.g. ``[16]`` = at 16×16); each must be one
    of the UNet's level sizes ``image_size // 2 ** level``, and becomes upstream's downsample RATE.
    The constructor's own checks (e.g. heads that do not divide) run on the meta device, without
    allocating a weight. Raises :class:`ConfigError` naming the problem.
    """
    levels = len(model.channel_mult)
    if image_size % 2 ** (levels - 1):
        raise ConfigError(f"model: image size {image_size} cannot be halved {levels - 1} times")
    level_sizes = [image_size // 2**level for level in range(levels)]
    for res in model.attention_resolutions:
        if res not in level_sizes:
            raise ConfigError(f"model: attention resolution {res} never occurs in this UNet "
                              f"(its feature maps are {level_sizes})")
    kwargs = dict(
        image_size=image_size,
        in_channels=channels,
        model_channels=model.model_channels,
        out_channels=channels * (2 if model.learn_sigma else 1),
        num_res_blocks=model.num_res_blocks,
        attention_resolutions=tuple(image_size // res for res in model.attention_resolutions),
        dropout=model.dropout,
        channel_mult=tuple(model.channel_mult),
        num_classes=num_classes,
        use_checkpoint=model.use_checkpoint,
        num_head_channels=model.num_head_channels,
        use_scale_shift_norm=model.use_scale_shift_norm,
        resblock_updown=model.resblock_updown,
        use_new_attention_order=model.use_new_attention_order,
    )
    try:
        with torch.device("meta"):
            UNetModel(**kwargs)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    return kwargs


def unet_kwargs_for(cfg: Config, num_classes: int | None) -> dict:
    """:func:`unet_kwargs` for a whole config: its data shape, and ``num_classes`` if class-conditional."""
    return unet_kwargs(cfg.model, cfg.data.image_size, cfg.data.channels, num_classes if cfg.data.class_cond else None)


def model_from_checkpoint(ckpt: Checkpoint, ema: bool = True, source: str = "checkpoint") -> UNetModel:
    """The checkpoint's UNet in eval mode, with its first EMA's weights when ``ema``."""
    try:
        model = UNetModel(**ckpt.unet_kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError, MemoryError) as err:  # a foreign or hostile file's arguments
        raise DebiasError(f"{source}: the stored model arguments do not build a UNet ({err})") from None
    load_weights(model, ckpt.weights(ema), source)
    return model.eval().requires_grad_(False)


@dataclass
class DiffusionModel:
    """A network with the diffusion it was trained for — all a sampler or an analysis needs.

    ``network(x, t, y)`` maps x (B, C, H, W), timesteps t (B,) and labels y (B,) or None to
    (B, C or 2C, H, W) predicting ``target``; ``image_shape`` is (C, H, W); ``config`` is the training
    config stored with the weights (empty if unknown).
    """

    network: Callable
    schedule: Schedule
    target: str
    learn_sigma: bool
    image_shape: tuple[int, int, int]
    num_classes: int | None = None
    config: dict = field(default_factory=dict)


def load_model(path: str | Path, ema: bool = True) -> DiffusionModel:
    """A checkpoint's model (its first EMA unless ``ema`` is False) on the CPU, in eval mode.

    The schedule, T, target and learned variance come from the stored config. A missing, corrupt,
    foreign or inconsistent checkpoint is one :class:`DebiasError` line naming the file.
    """
    ckpt = load_checkpoint(path)
    try:
        diffusion, target = ckpt.config["diffusion"], check_target(ckpt.config["target"])
        schedule = Schedule.named(diffusion["schedule"], int(diffusion["steps"]))
        learn_sigma = bool(ckpt.config["model"]["learn_sigma"])
    except (KeyError, TypeError, ValueError) as err:
        raise DebiasError(f"{path}: the stored config has no usable diffusion/target/model settings ({err})") from None
    network = model_from_checkpoint(ckpt, ema=ema, source=str(path))
    if network.out_channels != network.in_channels * (2 if learn_sigma else 1):
        raise DebiasError(f"{path}: config learn_sigma={learn_sigma} does not match the model's "
                          f"{network.out_channels} output channels")
    return DiffusionModel(network, schedule, target, learn_sigma,
                          (network.in_channels, network.image_size, network.image_size), network.num_classes,
                          ckpt.config)
