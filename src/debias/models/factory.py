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
from debias.limits import unet_problem
from debias.models.unet import UNetModel


def unet_kwargs(model: ModelConfig, image_size: int, channels: int, num_classes: int | None) -> dict:
    """The exact :class:`UNetModel` keyword arguments for the ``model`` params (stored in every checkpoint).

    ``model.attention_resolutions`` are feature-map SIDES (e.g. ``[16]`` = at 16×16); each must be one
    of the UNet's level sizes ``image_size // 2 ** level``, and becomes upstream's downsample RATE.
    The shape checks are :func:`debias.limits.unet_problem`'s (which config.py runs when params are loaded); the
    constructor's own run on the meta device, without allocating a weight. Raises :class:`ConfigError`
    naming the problem.
    """
    problem = unet_problem(image_size, model.model_channels, model.channel_mult, model.attention_resolutions,
                           model.num_head_channels)
    if problem is not None:
        raise ConfigError(": ".join(problem))
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


# what a checkpoint's UNet arguments may be: the caps of params.yaml (config.py), for values read from a file
INT_LIMITS = {"image_size": (4, 4096), "in_channels": (1, 16), "model_channels": (1, 4096), "out_channels": (1, 32),
              "num_res_blocks": (1, 64), "dims": (2, 2), "num_heads": (-1, 4096), "num_head_channels": (-1, 4096),
              "num_heads_upsample": (-1, 4096)}
FLAGS = ("conv_resample", "use_checkpoint", "use_fp16", "use_scale_shift_norm", "resblock_updown",
         "use_new_attention_order")
MAX_CLASSES = 1_000_000
MAX_STEPS = 100_000  # diffusion.steps, as config.py allows


def check_unet_kwargs(kwargs: dict, source: str) -> None:
    """DebiasError unless stored UNet arguments are known keys with values of the right type inside the
    caps params.yaml has — checked before anything is built."""
    def fail(key: str, why: str) -> None:
        raise DebiasError(f"{source}: the stored model argument {key}={kwargs.get(key)!r} {why}")

    unknown = sorted(set(kwargs) - set(INT_LIMITS) - set(FLAGS) - {"attention_resolutions", "dropout", "channel_mult",
                                                                   "num_classes"})
    if unknown:
        fail(unknown[0], "is not an argument of the UNet")
    for key in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
                "attention_resolutions"):
        if key not in kwargs:
            raise DebiasError(f"{source}: the stored model arguments lack {key}")
    for key, (low, high) in INT_LIMITS.items():
        if key in kwargs and (type(kwargs[key]) is not int or not low <= kwargs[key] <= high):
            fail(key, f"is not an integer in [{low}, {high}]")
    for key in FLAGS:
        if key in kwargs and type(kwargs[key]) is not bool:
            fail(key, "is not true or false")
    mult = kwargs.get("channel_mult", (1, 2, 4, 8))
    if not isinstance(mult, (list, tuple)) or not 1 <= len(mult) <= 12 or \
            any(type(m) is not int or not 1 <= m <= 64 for m in mult):
        fail("channel_mult", "is not a list of 1-12 integers in [1, 64]")
    rates = kwargs["attention_resolutions"]
    if not isinstance(rates, (list, tuple)) or len(rates) > 12 or any(type(r) is not int or not 1 <= r <= 4096 for r in rates):
        fail("attention_resolutions", "is not a list of at most 12 integers in [1, 4096]")
    dropout = kwargs.get("dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        fail("dropout", "is not a number in [0, 1)")
    classes = kwargs.get("num_classes")
    if classes is not None and (type(classes) is not int or not 1 <= classes <= MAX_CLASSES):
        fail("num_classes", f"is not null or an integer in [1, {MAX_CLASSES}]")


def model_from_checkpoint(ckpt: Checkpoint, ema: bool = True, source: str = "checkpoint") -> UNetModel:
    """The checkpoint's UNet in eval mode, with its first EMA's weights when ``ema``.

    The stored arguments are checked (:func:`check_unet_kwargs`) and the UNet is first built on the meta
    device and compared with the stored weights, so a file whose arguments would build a huge model
    is refused before any allocation."""
    check_unet_kwargs(ckpt.unet_kwargs, source)
    weights = ckpt.weights(ema)
    try:
        with torch.device("meta"):
            shapes = UNetModel(**ckpt.unet_kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise DebiasError(f"{source}: the stored model arguments do not build a UNet ({err})") from None
    load_weights(shapes, weights, source, check_only=True)
    model = UNetModel(**ckpt.unet_kwargs)
    load_weights(model, weights, source)
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
        steps = diffusion["steps"]
        if type(steps) is not int or not 2 <= steps <= MAX_STEPS:
            raise ValueError(f"diffusion.steps={steps!r} is not an integer in [2, {MAX_STEPS}]")
        schedule = Schedule.named(diffusion["schedule"], steps)
        learn_sigma = ckpt.config["model"]["learn_sigma"]
        if type(learn_sigma) is not bool:
            raise ValueError(f"model.learn_sigma={learn_sigma!r} is not true or false")
    except (KeyError, TypeError, ValueError) as err:
        raise DebiasError(f"{path}: the stored config has no usable diffusion/target/model settings ({err})") from None
    network = model_from_checkpoint(ckpt, ema=ema, source=str(path))
    if network.out_channels != network.in_channels * (2 if learn_sigma else 1):
        raise DebiasError(f"{path}: config learn_sigma={learn_sigma} does not match the model's "
                          f"{network.out_channels} output channels")
    return DiffusionModel(network, schedule, target, learn_sigma,
                          (network.in_channels, network.image_size, network.image_size), network.num_classes,
                          ckpt.config)
