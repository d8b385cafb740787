"""A training run's folder: where its files live, the lock, what to resume from, and the export.

``out_dir/checkpoint.pt`` holds everything a resumed run needs; ``out_dir/snapshots/step_{k:07d}.pt``
the weights kept at ``train.snapshot_steps``; ``out_dir/phema/phema-{k:07d}.pt`` the power-function EMA
profiles every ``train.phema_every`` steps (``train.ema: phema``); ``log_dir`` (often the same folder) the TSV logs of
:mod:`debias.train.logs`. Only rank 0 touches these files. ``out_dir/.train.lock`` is the run's advisory
lock (:mod:`debias.locks`): one writer at a time, whichever workspace it runs in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from debias.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from debias.config import Config
from debias.errors import DebiasError
from debias.io import atomic_write
from debias.locks import lock_file
from debias.phema import PHEMA_DIR
from debias.runtime import Ranks, on_main
from debias.schema import flatten
from debias.train.logs import TIMESTEP_LOG, TRAIN_LOG

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
SNAPSHOT_DIR = "snapshots"
LOCK = ".train.lock"
# the lock file that a job's launcher holds for its ranks (RunDir.held_for_job), inherited through torchrun
HELD_LOCK_ENV = "DEBIAS_HELD_TRAIN_LOCK"
# training-config keys that may change between a checkpoint and its resumption without changing the result
RESUMABLE_CHANGES = {"train.steps", "train.checkpoint_every", "train.snapshot_steps", "train.log_every",
                     "train.devices", "train.data_loading", "train.num_workers", "train.compile", "data.path", "data.on_error"}


def run_key(cfg: Config) -> str:
    """``<weighting>-<target>-<8 hex>``: a name for the training state of ``cfg``'s recipe, the same for
    every config that resumes it (the digest covers the training params except :data:`RESUMABLE_CHANGES`)."""
    relevant = {k: v for k, v in flatten(cfg.training_dict()).items() if k not in RESUMABLE_CHANGES}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.weighting}-{cfg.target}-{digest}"


def config_change(saved: dict, cfg: Config) -> str | None:
    """The first training-relevant key whose value differs from a checkpoint's config, as 'key: old → new'."""
    new = cfg.training_dict()
    old, new = flatten({k: saved.get(k) for k in new}), flatten(new)
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} → {new.get(key)!r}"
    return None


@dataclass(frozen=True)
class RunDir:
    """The files of one training run (see the module docstring)."""

    out_dir: Path
    log_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / CHECKPOINT

    def snapshot(self, step: int) -> Path:
        return self.out_dir / SNAPSHOT_DIR / f"step_{step:07d}.pt"

    def phema_snapshot(self, step: int) -> Path:
        """The power-function EMA profiles at ``step`` (:mod:`debias.phema`)."""
        return self.out_dir / PHEMA_DIR / f"phema-{step:07d}.pt"

    @property
    def lock(self) -> Path:
        return self.out_dir / LOCK

    @contextlib.contextmanager
    def locked(self, ranks: Ranks) -> Iterator[None]:
        """Hold the advisory lock of ``out_dir`` (rank 0), so two runs never write the same files; the lock
        dies with its process. A held lock is one DebiasError line on every rank — unless this job holds it
        already (:meth:`held_for_job`)."""
        lock = on_main(self._lock, ranks, share=False)
        try:
            yield
        finally:
            if lock is not None:
                os.close(lock)

    def _lock(self) -> int | None:
        if self._held_by_this_job():
            return None
        lock = lock_file(self.lock, wait=False)
        if lock is None:
            raise DebiasError(f"another training run is writing to {self.out_dir}")
        return lock

    def _held_by_this_job(self) -> bool:
        return os.environ.get(HELD_LOCK_ENV) == str(self.lock.resolve())

    @contextlib.contextmanager
    def held_for_job(self) -> Iterator[None]:
        """Hold the lock of ``out_dir`` for a whole job, waiting (with a note) while another run holds it. It
        survives the job's relaunch under torchrun, whose ranks find it held (``DEBIAS_HELD_TRAIN_LOCK``) and
        do not take it again (under a torchrun started by hand, rank 0 alone takes it). The train stage holds it across training and the export of the model, so that
        two experiments of one recipe take turns, and no other run writes the state in between."""
        if self._held_by_this_job() or os.environ.get("RANK", "0") != "0":
            yield  # a rank of a job whose launcher holds it; or of a torchrun started by hand, where rank 0 locks
            return
        lock = lock_file(self.lock, wait=False)
        if lock is None:
            log.info("note: another training run holds %s; waiting for it to finish", self.out_dir)
            lock = lock_file(self.lock, wait=True)
        os.environ[HELD_LOCK_ENV] = str(self.lock.resolve())
        try:
            yield
        finally:
            del os.environ[HELD_LOCK_ENV]
            os.close(lock)

    def resume_point(self, cfg: Config, unet_kwargs: dict, dataset_size: int, resume: bool) -> Checkpoint | None:
        """The checkpoint to continue from, or None to start over (a checkpoint of another
        configuration, model shape or dataset size is reported and not resumed)."""
        path = self.checkpoint
        if not resume or not path.exists():
            return None
        ckpt = load_checkpoint(path)
        change = config_change(ckpt.config, cfg)
        if change is None and ckpt.unet_kwargs != unet_kwargs:
            change = "the model's shape"
        if change is None and ckpt.extra.get("dataset_size") != dataset_size:
            change = f"dataset size: {ckpt.extra.get('dataset_size')} → {dataset_size}"
        if change is not None:
            log.warning("warning: %s was trained with another configuration (%s); starting over", path, change)
            return None
        if ckpt.step > cfg.train.steps:
            raise DebiasError(f"{path} is at step {ckpt.step}, beyond train.steps={cfg.train.steps}; "
                              "raise train.steps or use --no-resume")
        return ckpt

    def remove_leftovers(self, fresh: bool) -> None:
        """Temporary files of a killed writer; for a fresh run also the old checkpoint and snapshots."""
        snapshots, profiles = self.out_dir / SNAPSHOT_DIR, self.out_dir / PHEMA_DIR
        for folder, name in ((self.out_dir, CHECKPOINT), (snapshots, "step_*"), (profiles, "phema-*"),
                             (self.log_dir, TRAIN_LOG), (self.log_dir, TIMESTEP_LOG)):
            for tmp in folder.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        if fresh:
            self.checkpoint.unlink(missing_ok=True)
            for old in [*snapshots.glob("step_*.pt"), *profiles.glob("phema-*.pt")]:
                old.unlink()


def export_model(checkpoint_dir: str | Path, model_path: str | Path, snapshots_dir: str | Path | None = None,
                 phema_dir: str | Path | None = None) -> None:
    """Write the finished run's weights, EMAs, uncertainty head and config (no optimizer or RNG state) to
    ``model_path``, and copy its snapshots into ``snapshots_dir`` and its post-hoc EMA profiles (up to the
    run's last step) into ``phema_dir``, replacing what was there."""
    checkpoint_dir = Path(checkpoint_dir)
    ckpt = load_checkpoint(checkpoint_dir / CHECKPOINT)
    extra = {key: ckpt.extra[key] for key in ("uncertainty",) if key in ckpt.extra}
    save_checkpoint(model_path, Checkpoint(config=ckpt.config, unet_kwargs=ckpt.unet_kwargs, model=ckpt.model,
                                           ema=ckpt.ema, step=ckpt.step, extra=extra))
    for source, pattern, target in ((SNAPSHOT_DIR, "step_*.pt", snapshots_dir), (PHEMA_DIR, "phema-*.pt", phema_dir)):
        if target is None:
            continue
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob(pattern):
            old.unlink()
        for snap in sorted((checkpoint_dir / source).glob(pattern)):
            if int(snap.stem.split("_")[-1].split("-")[-1]) <= ckpt.step:
                atomic_write(target / snap.name, lambda f, src=snap: _copy_into(src, f))


def _copy_into(src: Path, dst) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, dst)
