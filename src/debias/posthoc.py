"""Post-hoc EMA on disk: the profile snapshots a run trained with ``train.ema: phema`` writes
(``phema/phema-<step>.pt``, checkpoints whose EMAs are the profiles) and the EMA of any length rebuilt
from them (:mod:`debias.phema` has the math), one snapshot in memory at a time."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import Tensor

from debias.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from debias.errors import DebiasError
from debias.phema import PHEMA_DIR, check_std, coefficients, profile_key


def snapshot_files(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, file) of the profile snapshots in ``folder`` (or its ``phema/``), by step."""
    folder = Path(folder)
    if not folder.exists():
        raise DebiasError(f"{folder}: not found")
    if (folder / PHEMA_DIR).is_dir():
        folder = folder / PHEMA_DIR
    found = []
    for path in folder.glob("phema-*.pt") if folder.is_dir() else ():
        digits = path.stem.removeprefix("phema-")
        if digits.isdigit():
            found.append((int(digits), path))
    if not found:
        raise DebiasError(f"{folder}: no post-hoc EMA snapshots (phema-<step>.pt) here; train with train.ema: phema")
    return sorted(found)


def reconstruct(folder: str | Path, std: float, step: int | None = None,
                using: Sequence[float] | None = None) -> Checkpoint:
    """The weights of EMA length σ_rel ``std`` at ``step`` (default: the last snapshot) from the profile
    snapshots in ``folder`` — all their profiles, or those of σ_rel ``using`` — as a checkpoint whose one EMA
    is ``phema-<std>``. Reads one snapshot at a time."""
    check_std(std)
    files = snapshot_files(folder)
    last = files[-1][0]
    step = last if step is None else step
    if step > last:
        raise DebiasError(f"{folder}: step {step} is beyond the last post-hoc EMA snapshot ({last})")
    files = [(s, p) for s, p in files if s <= step]
    if not files:
        raise DebiasError(f"{folder}: no post-hoc EMA snapshot at or before step {step} (the first is at {last})")
    first = load_checkpoint(files[0][1])
    stored = list(first.ema)
    if not stored or not all(k.startswith("phema-") for k in stored):
        raise DebiasError(f"{files[0][1]}: not a post-hoc EMA snapshot (its EMAs are {', '.join(stored) or 'none'})")
    keys = stored if using is None else [profile_key(check_std(v)) for v in using]
    absent = [k for k in keys if k not in stored]
    if absent or not keys:
        raise DebiasError(f"{files[0][1]}: has no profile {', '.join(absent) or '(none asked)'}; it has {', '.join(stored)}")
    stds = [float(k.removeprefix("phema-")) for k in keys]
    x = coefficients([s for s, _ in files for _ in stds], stds * len(files), step, std)
    total: dict[str, Tensor] = {}
    for i, (_, path) in enumerate(files):
        snap = first if i == 0 else load_checkpoint(path)
        if list(snap.ema) != stored:
            raise DebiasError(f"{path}: its profiles {', '.join(snap.ema)} differ from {', '.join(stored)}")
        for j, key in enumerate(keys):
            for name, value in snap.ema[key].items():
                if not value.is_floating_point():
                    total[name] = value
                    continue
                term = value.double() * float(x[i * len(keys) + j])
                total[name] = term if name not in total else total[name] + term
        last_snap = snap
    dtypes = {name: value.dtype for name, value in first.ema[keys[0]].items()}
    weights = {name: value.to(dtypes[name]) for name, value in total.items()}
    return Checkpoint(config=last_snap.config, unet_kwargs=last_snap.unet_kwargs, model=weights,
                      ema={profile_key(std): weights}, step=step,
                      extra={"phema": {"std": std, "snapshots": [s for s, _ in files],
                                       "coefficients": [float(v) for v in x]}})


def reconstruct_to(folder: str | Path, std: float, out: str | Path, step: int | None = None,
                   using: Sequence[float] | None = None) -> Checkpoint:
    """:func:`reconstruct` written to ``out`` (atomically)."""
    ckpt = reconstruct(folder, std, step, using)
    save_checkpoint(out, ckpt)
    return ckpt


@contextlib.contextmanager
def sampling_checkpoint(checkpoint: str | Path, ema_std: float | None) -> Iterator[Path]:
    """``checkpoint`` itself, or with ``ema_std`` (``sample.ema_std``) the post-hoc EMA of that length rebuilt
    from the profile snapshots beside it (``<its folder>/phema/``: ``models/phema`` for ``models/model.pt``)
    into a temporary file — the same bytes every time, so that resumable sampling recognises it."""
    checkpoint = Path(checkpoint)
    if ema_std is None:
        yield checkpoint
        return
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = Path(tmp) / "model.pt"
        reconstruct_to(checkpoint.parent / PHEMA_DIR, ema_std, rebuilt)
        yield rebuilt
