"""Import checkpoints of the original code (guided-diffusion / the paper's fork) into this project's format.

The original saves a bare ``state_dict`` (``model*.pt`` or ``ema_<rate>_*.pt``); what it means is
given by the command-line flags it was trained with, e.g. the paper's CelebA-HQ models::

    --attention_resolutions 16 --class_cond False --diffusion_steps 1000 --dropout 0.0 --image_size 256
    --learn_sigma True --noise_schedule linear --num_channels 128 --num_head_channels 64
    --num_res_blocks 1 --resblock_updown True --use_fp16 False --use_scale_shift_norm True
    [--predict_xstart True | --predict_v True]
"""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from debias.checkpoints import Checkpoint, load_untrusted, load_weights, save_checkpoint
from debias.config import Config
from debias.errors import DebiasError
from debias.models.unet import UNetModel, flag_bool, unet_kwargs_from_flags


def parse_flags(text: str) -> dict[str, str]:
    """``"--image_size 256 --learn_sigma True"`` (or ``--key=value``) → {"image_size": "256", ...}."""
    flags: dict[str, str] = {}
    tokens = shlex.split(text)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise DebiasError(f"flags: expected --name value, got {token!r}")
        name = token[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            value, i = "True", i + 1
        flags[name.replace("-", "_")] = value
    return flags


def config_from_flags(flags: dict[str, str], unet_kwargs: dict) -> dict:
    """This project's config (as a plain dict) describing the original run: data shape, model,
    diffusion steps and schedule, and the target (``predict_xstart`` → x0, ``predict_v`` → v)."""
    try:
        xstart, v = (flag_bool(flags.get(name, False)) for name in ("predict_xstart", "predict_v"))
    except ValueError as err:
        raise DebiasError(f"flags: {err}") from None
    if xstart and v:
        raise DebiasError("flags: predict_xstart and predict_v cannot both be true")
    target = "x0" if xstart else "v" if v else "eps"
    size = unet_kwargs["image_size"]
    cfg = Config().to_dict()
    cfg.update(target=target, weighting=flags.get("weighting", "constant"))
    cfg["data"].update(name="folder", path=flags.get("data_dir"), image_size=size, channels=unet_kwargs["in_channels"],
                       class_cond=unet_kwargs["num_classes"] is not None)
    cfg["model"].update(model_channels=unet_kwargs["model_channels"], channel_mult=list(unet_kwargs["channel_mult"]),
                        num_res_blocks=unet_kwargs["num_res_blocks"],
                        attention_resolutions=[size // r for r in unet_kwargs["attention_resolutions"]],
                        num_head_channels=unet_kwargs["num_head_channels"], dropout=unet_kwargs["dropout"],
                        learn_sigma=unet_kwargs["out_channels"] == 2 * unet_kwargs["in_channels"],
                        use_scale_shift_norm=unet_kwargs["use_scale_shift_norm"],
                        resblock_updown=unet_kwargs["resblock_updown"],
                        use_new_attention_order=unet_kwargs["use_new_attention_order"])
    cfg["diffusion"].update(steps=int(flags.get("diffusion_steps", 1000)),
                            schedule=flags.get("noise_schedule", "linear"))
    cfg["imported_flags"] = dict(flags)
    return cfg


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    blob = load_untrusted(path, "state dict")
    if isinstance(blob, dict) and "state_dict" in blob and isinstance(blob["state_dict"], dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise DebiasError(f"{path} is not a bare state dict of tensors")
    return blob


def convert_checkpoint(state_dict_path: str | Path, flags: dict[str, str], out: str | Path) -> Checkpoint:
    """Build the UNet the flags describe, load the original weights into it (strict), and save a
    debias checkpoint at ``out``. Returns the checkpoint."""
    state_dict = _read_state_dict(Path(state_dict_path))
    try:
        kwargs = unet_kwargs_from_flags(flags)
    except (ValueError, TypeError) as err:
        raise DebiasError(f"flags: {err}") from None
    kwargs.update(use_fp16=False, use_checkpoint=False)
    model = UNetModel(**kwargs)
    load_weights(model, {k: v.float() for k, v in state_dict.items()}, str(state_dict_path))
    cfg = config_from_flags(flags, kwargs)
    ckpt = Checkpoint(config=cfg, unet_kwargs=kwargs, model=model.state_dict(),
                      extra={"imported_from": str(state_dict_path)})
    save_checkpoint(out, ckpt)
    return ckpt
