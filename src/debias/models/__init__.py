"""Denoising networks: the ADM UNet (:mod:`~debias.models.unet`, built from the blocks in
:mod:`~debias.models.layers`) and :mod:`~debias.models.factory`, which builds it from params or
loads it, with its diffusion, from a checkpoint."""
