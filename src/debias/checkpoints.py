"""One checkpoint format for the whole project, written atomically and read without pickle.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: a file can never execute code. Writes go to a temporary file in
the same folder followed by ``os.replace``, so a reader (or a killed writer) never sees a torn file.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from debias import __version__
from debias.errors import DebiasError
from debias.io import atomic_write

FORMAT = "debias-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """Everything needed to resume training or to sample.

    ``unet_kwargs`` are the exact ``UNetModel(**kwargs)`` arguments, so a model is rebuilt without
    reinterpreting the config; ``ema`` maps the rate (as a string, e.g. "0.999") to its weights.
    """

    config: dict
    unet_kwargs: dict
    model: dict[str, Tensor]
    ema: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    step: int = 0
    optimizer: dict | None = None
    scaler: dict | None = None
    rng: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    library_version: str = __version__

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": self.library_version,
                "config": self.config, "unet_kwargs": self.unet_kwargs, "model": self.model, "ema": self.ema,
                "step": self.step, "optimizer": self.optimizer, "scaler": self.scaler, "rng": self.rng,
                "extra": self.extra}

    def weights(self, ema: bool = True) -> dict[str, Tensor]:
        """The first EMA's weights if ``ema`` and any exist, else the raw model weights."""
        if ema and self.ema:
            return next(iter(self.ema.values()))
        return self.model


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Save atomically (temp file + rename)."""
    atomic_write(path, lambda f: torch.save(ckpt.to_dict(), f))


def load_error_reason(err: BaseException) -> str:
    """The informative line of a ``torch.load`` error (torch's own message starts with advice to load
    with ``weights_only=False``, which must never be followed for an untrusted file)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(err).__name__)[:200]


def load_untrusted(path: Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a file nobody vouches for. Any problem is one
    :class:`DebiasError` line naming the file and ``what`` it should be: a missing file, a pickle of
    objects other than tensors and plain containers (refused, never run), or a damaged file."""
    if not path.is_file():
        raise DebiasError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the "pickle protocol" of random bytes
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 — a damaged file makes torch.load raise many types
        reason = load_error_reason(err)
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in reason:
            raise DebiasError(f"{path} is not a safe {what} (refusing to unpickle: {reason})") from None
        raise DebiasError(f"{path} is not a readable {what} (truncated or corrupt: {reason})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint safely; any problem is one :class:`DebiasError` line naming the file."""
    path = Path(path)
    blob = load_untrusted(path, "checkpoint", map_location)
    if not isinstance(blob, dict) or not isinstance(blob.get("format"), str) or blob["format"] != FORMAT:
        raise DebiasError(f"{path} is not a debias checkpoint; import original weights with `debias convert`")
    if not isinstance(blob.get("format_version"), int) or blob["format_version"] != FORMAT_VERSION:
        raise DebiasError(f"{path} has checkpoint format version {blob.get('format_version')}, expected {FORMAT_VERSION}")
    for key in ("config", "unet_kwargs", "model"):
        if not isinstance(blob.get(key), dict):
            raise DebiasError(f"{path} is not a complete debias checkpoint: '{key}' is missing or not a mapping")
    if not isinstance(blob.get("step", 0), int):
        raise DebiasError(f"{path} is not a complete debias checkpoint: 'step' is not an integer")
    return Checkpoint(config=blob["config"], unet_kwargs=blob["unet_kwargs"], model=blob["model"],
                      ema=blob.get("ema") or {}, step=int(blob.get("step", 0)), optimizer=blob.get("optimizer"),
                      scaler=blob.get("scaler"), rng=blob.get("rng") or {}, extra=blob.get("extra") or {},
                      library_version=blob.get("library_version", "unknown"))


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """``model.load_state_dict(strict=True)`` with mismatches reported as one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise DebiasError(f"{source} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)
