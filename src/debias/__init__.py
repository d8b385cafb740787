"""debias — train, sample and score diffusion models with any target and loss weighting."""

__version__ = "0.1.0"
