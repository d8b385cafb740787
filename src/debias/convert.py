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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from debias.checkpoints import Checkpoint, load_untrusted, load_weights, save_checkpoint
from debias.config import Config
from debias.errors import DebiasError
from debias.models.unet import UNetModel

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
