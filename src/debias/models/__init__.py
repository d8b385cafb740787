"""Denoising networks."""

from debias.models.unet import UNetModel, build_unet, build_unet_kwargs, unet_kwargs_from_flags

__all__ = ["UNetModel", "build_unet", "build_unet_kwargs", "unet_kwargs_from_flags"]
