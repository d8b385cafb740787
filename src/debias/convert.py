"""Import checkpoints of the original code (guided-diffusion / the paper's fork) into this project's format.

The original saves a bare ``state_dict`` (``model*.pt`` or ``ema_<rate>_*.pt``); what it means is
given by the command-line flags it was trained with, e.g. the paper's CelebA-HQ models::

    --attention_resolutions 16 --class_cond False --diffusion_steps 1000 --dropout 0.0 --image_size 256
    --learn_sigma True --noise_schedule linear --num_channels 128 --num_head_channels 64
    --num_res_blocks 1 --resblock_updown True --use_fp16 False --use_scale_shift_norm True
    [--predict_xstart True | --predict_v True]
"""

from __future__ import annotations

import pickle
import shlex
import warnings
from pathlib import Path
from typing import Any

import torch

from debias.checkpoints import Checkpoint, load_error_reason, load_weights, save_checkpoint
from debias.config import Config
from debias.errors import DebiasError
from debias.models.unet import UNetModel, unet_kwargs_from_flags


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


def _truthy(value: Any) -> bool:
    return str(value).lower() in ("yes", "true", "t", "y", "1")


def config_from_flags(flags: dict[str, str], unet_kwargs: dict) -> dict:
    """This project's config (as a plain dict) describing the original run: data shape, model,
    diffusion steps and schedule, and the target (``predict_xstart`` → x0, ``predict_v`` → v)."""
    if _truthy(flags.get("predict_xstart", False)) and _truthy(flags.get("predict_v", False)):
        raise DebiasError("flags: predict_xstart and predict_v cannot both be true")
    target = "x0" if _truthy(flags.get("predict_xstart", False)) else "v" if _truthy(flags.get("predict_v", False)) else "eps"
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
    if not path.is_file():
        raise DebiasError(f"state dict not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the "pickle protocol" of random bytes
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in load_error_reason(err):
            raise DebiasError(f"{path} is not a readable state dict ({load_error_reason(err)})") from None
        raise DebiasError(f"{path} holds objects other than tensors; refusing to unpickle it") from None
    except Exception as err:  # noqa: BLE001 — a damaged file makes torch.load raise many types
        raise DebiasError(f"{path} is not a readable state dict ({load_error_reason(err)})") from None
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
        kwargs = unet_kwargs_from_flags({k: v for k, v in flags.items()})
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
