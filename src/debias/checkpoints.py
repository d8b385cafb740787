"""One checkpoint format for the whole project, written atomically and read without pickle.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: a file can never execute code. Writes go to a temporary file in
the same folder followed by ``os.replace``, so a reader (or a killed writer) never sees a torn file.

Reading is bounded and checked before use: the zip's records are checked against the file from its
central directory before torch inflates any (torch writes them stored; a compressed one may not
inflate beyond :data:`INFLATE_LIMIT` × its size), the loaded dict is checked as a schema (every
field's type and range, nesting at most :data:`MAX_DEPTH` deep, finite weights), and every tensor is
compared with the CRC-32 written beside it at save (format 2), so a flipped byte is one line naming
the tensor.
"""

from __future__ import annotations

import math
import pickle
import stat
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from debias import __version__
from debias.errors import DebiasError
from debias.io import atomic_write
from debias.catalog import PHEMA_STD_MAX

FORMAT = "debias-checkpoint"
FORMAT_VERSION = 2  # 2: per-tensor CRC-32 checksums; 1 (read too): none
MAX_DEPTH = 32  # nesting of containers in a checkpoint (ours: 6)
INFLATE_LIMIT = 4  # a compressed record may inflate to at most this × its size (+1 MiB); torch stores them


@dataclass
class Checkpoint:
    """Everything needed to resume training or to sample.

    ``unet_kwargs`` are the exact ``UNetModel(**kwargs)`` arguments, so a model is rebuilt without
    reinterpreting the config; ``ema`` maps the rate (as a string, e.g. "0.999") or the power-function
    profile (``phema-0.05``, :mod:`debias.phema`) to its weights.
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
        """The saved form, with the CRC-32 of every tensor (by its path, e.g. ``model.out.2.weight``)."""
        blob = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": self.library_version,
                "config": self.config, "unet_kwargs": self.unet_kwargs, "model": self.model, "ema": self.ema,
                "step": self.step, "optimizer": self.optimizer, "scaler": self.scaler, "rng": self.rng,
                "extra": self.extra}
        blob["checksums"] = {where: crc32(tensor) for where, tensor in tensors(blob)}
        return blob

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


def crc32(tensor: Tensor) -> int:
    """The CRC-32 of a tensor's bytes (C order)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy() if flat.numel() else b"")


def tensors(tree: Any, where: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor in a nest of dicts and lists, with its dotted path (iteratively, any depth)."""
    stack = [(where, tree)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, Tensor):
            yield where, value
        elif isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items() if where or k != "checksums")
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{where}.{i}", v) for i, v in enumerate(value))


def check_regular_file(path: Path, what: str) -> None:
    """DebiasError unless ``path`` is (a link to) a regular file: a FIFO would block a reader, and
    /dev/zero never ends."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DebiasError(f"{what} not found: {path}") from None
    except OSError as err:
        raise DebiasError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        kind = "folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "device or special file"
        raise DebiasError(f"{path} is not a regular file (a {kind}); a {what} is a file")


def check_zip_records(path: Path, what: str) -> None:
    """A torch zip's records, from its central directory, before torch reads any: each must lie inside
    the file, and a compressed one (torch never writes them) may not inflate past :data:`INFLATE_LIMIT`."""
    if not zipfile.is_zipfile(path):
        return  # a legacy torch file or a raw pickle: torch reads it from the file as it is
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise DebiasError(f"{path} is not a readable {what} (corrupt zip: {err})") from None
    for info in records:
        if info.compress_type != zipfile.ZIP_STORED:
            if info.file_size > INFLATE_LIMIT * info.compress_size + (1 << 20):
                raise DebiasError(f"{path}: record {info.filename} is compressed and would inflate to "
                                  f"{info.file_size / 2**20:.0f} MiB from {info.compress_size / 2**20:.1f} MiB "
                                  f"(a decompression bomb?); refusing to read it")
        elif info.file_size != info.compress_size or info.header_offset + info.compress_size > size:
            raise DebiasError(f"{path}: record {info.filename} declares more data than the file holds "
                              "(truncated or forged)")


def load_untrusted(path: Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a file nobody vouches for. Any problem is one
    :class:`DebiasError` line naming the file and ``what`` it should be: a missing or special file, a
    record that would inflate or that the file does not hold, a pickle of objects other than tensors
    and plain containers (refused, never run), or a damaged file."""
    check_regular_file(path, what)
    check_zip_records(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the "pickle protocol" of random bytes
            return torch.load(path, map_location=map_location, weights_only=True)
    except RecursionError:
        raise DebiasError(f"{path} is not a usable {what}: its values are nested too deeply") from None
    except MemoryError:
        raise DebiasError(f"{path}: not enough memory to read this {what}") from None
    except Exception as err:  # noqa: BLE001 — a damaged file makes torch.load raise many types
        reason = load_error_reason(err)
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in reason:
            raise DebiasError(f"{path} is not a safe {what} (refusing to unpickle: {reason})") from None
        raise DebiasError(f"{path} is not a readable {what} (truncated or corrupt: {reason})") from None


PLAIN = (type(None), bool, int, float, str, bytes, Tensor, torch.Size, torch.dtype, torch.device)


def check_plain(path: Path, blob: Any) -> None:
    """DebiasError unless ``blob`` is a nest of dicts/lists/tuples of :data:`PLAIN` values at most
    :data:`MAX_DEPTH` deep (walked iteratively: a deep file cannot exhaust the stack)."""
    stack = [(blob, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise DebiasError(f"{path} is not a usable checkpoint: its values are nested more than {MAX_DEPTH} deep")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
        elif not isinstance(value, PLAIN):
            raise DebiasError(f"{path} is not a usable checkpoint: it holds a {type(value).__name__}")


def _weights(path: Path, value: Any, where: str) -> dict[str, Tensor]:
    """``value`` checked as a non-empty mapping of names to finite floating tensors."""
    if not isinstance(value, dict) or not value:
        raise DebiasError(f"{path}: '{where}' is not a mapping of weights")
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise DebiasError(f"{path}: '{where}' entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DebiasError(f"{path}: weight {where}.{name} holds NaN or infinite values; refusing to use it")
    return value


def check_checksums(path: Path, blob: dict) -> None:
    """Every tensor against the CRC-32 saved with it (format 2)."""
    saved = blob.get("checksums")
    if not isinstance(saved, dict):
        raise DebiasError(f"{path}: the tensor checksums are missing (the file is damaged)")
    found = dict(tensors(blob))
    for where in sorted(set(saved) ^ set(found)):
        raise DebiasError(f"{path}: tensor {where} {'is missing' if where in saved else 'has no checksum'} "
                          "(the file is damaged)")
    for where, tensor in found.items():
        if crc32(tensor) != saved[where]:
            raise DebiasError(f"{path}: tensor {where} does not match its checksum (the file is damaged)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint safely and check it as a schema; any problem is one :class:`DebiasError`
    line naming the file (and the field or tensor)."""
    path = Path(path)
    blob = load_untrusted(path, "checkpoint", map_location)
    if not isinstance(blob, dict) or not isinstance(blob.get("format"), str) or blob["format"] != FORMAT:
        raise DebiasError(f"{path} is not a debias checkpoint; import original weights with `debias convert`")
    version = blob.get("format_version")
    if type(version) is not int or version not in (1, FORMAT_VERSION):
        raise DebiasError(f"{path} has checkpoint format version {version!r}, expected {FORMAT_VERSION}")
    check_plain(path, blob)
    for key in ("config", "unet_kwargs", "model"):
        if not isinstance(blob.get(key), dict):
            raise DebiasError(f"{path} is not a complete debias checkpoint: '{key}' is missing or not a mapping")
    step = blob.get("step", 0)
    if type(step) is not int or step < 0:
        raise DebiasError(f"{path}: 'step' is {step!r}, not a step number >= 0")
    ema = blob.get("ema") or {}
    if not isinstance(ema, dict):
        raise DebiasError(f"{path}: 'ema' is a {type(ema).__name__}, not a mapping of rates to weights")
    for rate, weights in ema.items():
        if not isinstance(rate, str) or not _is_ema_name(rate):
            raise DebiasError(f"{path}: EMA {rate!r} is neither a rate in [0, 1) nor a profile phema-<σ_rel>")
        _weights(path, weights, f"ema.{rate}")
    _weights(path, blob["model"], "model")
    for key, kind in (("optimizer", dict), ("scaler", dict), ("rng", dict), ("extra", dict)):
        if blob.get(key) is not None and not isinstance(blob[key], kind):
            raise DebiasError(f"{path}: '{key}' is a {type(blob[key]).__name__}, not a mapping")
    if any(not isinstance(v, Tensor) for v in (blob.get("rng") or {}).values()):
        raise DebiasError(f"{path}: 'rng' holds something other than generator states")
    if version >= 2:
        check_checksums(path, blob)
    return Checkpoint(config=blob["config"], unet_kwargs=blob["unet_kwargs"], model=blob["model"], ema=ema,
                      step=step, optimizer=blob.get("optimizer"), scaler=blob.get("scaler"), rng=blob.get("rng") or {},
                      extra=blob.get("extra") or {}, library_version=str(blob.get("library_version", "unknown")))


def _is_ema_name(text: str) -> bool:
    """A traditional EMA's rate in [0, 1) ("0.999") or a power-function profile's σ_rel ("phema-0.05")."""
    profile = text.startswith("phema-")
    try:
        value = float(text.removeprefix("phema-"))
    except ValueError:
        return False
    return math.isfinite(value) and (0.0 < value < PHEMA_STD_MAX if profile else 0.0 <= value < 1.0)


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str, check_only: bool = False) -> None:
    """``model.load_state_dict(strict=True)`` with mismatches reported as one line (``check_only``:
    only compare names and shapes, e.g. with a model on the meta device)."""
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
    if not check_only:
        model.load_state_dict(state_dict, strict=True)
