"""The training loop: one recipe (target × weighting) on one dataset, resumable bit for bit.

Every random draw comes from an explicit generator whose state is checkpointed: the data order is a
per-epoch permutation seeded by (seed, epoch), and timesteps, noise and flips are drawn for the
whole global batch and sliced by rank. A run killed at any moment and restarted therefore ends
with the same weights as an uninterrupted one (bitwise on CPU), and N processes under torchrun
compute the same gradients as one process with the same global batch (up to reduction order).

Files (only rank 0 writes): ``out_dir/checkpoint.pt`` (atomic, every ``train.checkpoint_every``
steps and at the end), ``out_dir/snapshots/step_{k:07d}.pt`` at ``train.snapshot_steps``, and in
``log_dir`` ``train_log.tsv`` (every ``train.log_every`` steps) and ``timestep_loss.tsv``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from debias.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from debias.config import AUTOCAST_DTYPES, Config
from debias.data import ImageDataset, load_dataset
from debias.diffusion.losses import diffusion_loss, timestep_buckets
from debias.diffusion.schedule import Schedule
from debias.diffusion.weighting import loss_weights
from debias.errors import DebiasError
from debias.io import atomic_write
from debias.models.factory import unet_kwargs_for
from debias.models.unet import UNetModel

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
SNAPSHOT_DIR = "snapshots"
TRAIN_LOG = "train_log.tsv"
TIMESTEP_LOG = "timestep_loss.tsv"
LOG_COLUMNS = ("step", "loss", "mse", "vb", "grad_norm", "lr", "images_per_s")
BUCKETS = 10
# train.* keys that may change between a checkpoint and its resumption without changing the result
RESUMABLE_CHANGES = {"train.steps", "train.checkpoint_every", "train.snapshot_steps", "train.log_every",
                     "train.devices", "train.num_workers", "train.compile", "data.path", "data.on_error"}
TRAINING_SECTIONS = ("weighting", "target", "seed", "data", "model", "diffusion", "loss", "train")


@dataclass
class TrainResult:
    """What :func:`train` did: the checkpoint it left, the step it reached and where it started."""

    checkpoint: Path
    step: int
    start_step: int
    loss: float | None          # the last logged mean loss (None if nothing was ever logged)
    seconds: float
    is_main_process: bool = True


# --------------------------------------------------------------------------- processes and devices

@dataclass
class Ranks:
    """This process's place in the run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def select_device(devices: str, local_rank: int) -> torch.device:
    if devices == "cpu" or (devices == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DebiasError("train.devices is 'cuda' but no CUDA device is available")
    if local_rank >= torch.cuda.device_count():
        raise DebiasError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", local_rank)


def _setup_processes(devices: str) -> tuple[Ranks, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(devices, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return Ranks(), device
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def _reduced(x: Tensor, ranks: Ranks) -> Tensor:
    """Sum of ``x`` over all ranks (a copy; ``x`` itself is unchanged)."""
    x = x.clone()
    if ranks.world > 1:
        dist.all_reduce(x)
    return x


def enable_fast_math(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (fp32 runs), as guided-diffusion's Ampere defaults."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


# --------------------------------------------------------------------------- randomness

def stream_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for random stream ``stream`` of run ``seed``."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


STREAMS = {"timesteps": 1, "noise": 2, "flip": 3}


def make_generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    return {name: torch.Generator(device).manual_seed(stream_seed(seed, k)) for name, k in STREAMS.items()}


class EpochSampler:
    """Global batches of dataset indices.

    Step k takes positions k·B … k·B + B − 1 of the endless concatenation of per-epoch permutations;
    epoch e's permutation comes from a generator seeded by (seed, e). The order therefore depends
    only on (seed, step), which makes resuming exact without any sampler state.
    """

    def __init__(self, size: int, batch_size: int, seed: int, device: torch.device):
        self.size, self.batch_size, self.seed, self.device = size, batch_size, seed, device
        self._cache: dict[int, Tensor] = {}

    def permutation(self, epoch: int) -> Tensor:
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(stream_seed(self.seed, 1000 + epoch))
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = torch.randperm(self.size, generator=gen).to(self.device)
        return self._cache[epoch]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of the first sample of step ``step``."""
        return divmod(step * self.batch_size, self.size)

    def batch(self, step: int) -> Tensor:
        """Indices (B,) int64 of step ``step`` (0-based), on the sampler's device."""
        start, parts, left = step * self.batch_size, [], self.batch_size
        while left:
            epoch, offset = divmod(start, self.size)
            part = self.permutation(epoch)[offset:offset + left]
            parts.append(part)
            start, left = start + len(part), left - len(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# --------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving averages of a model's parameters at several rates.

    With warm-up the rate of update k (0-based) is min(rate, (1 + k)/(10 + k)), so short runs get a
    useful average instead of one dominated by the initialisation.
    """

    def __init__(self, model: nn.Module, rates: list[float], warmup: bool):
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.warmup = warmup
        self.shadows = {str(rate): [p.detach().clone() for p in self.params] for rate in rates}

    @torch.no_grad()
    def update(self, k: int) -> None:
        current = [p.detach() for p in self.params]
        for rate, shadow in self.shadows.items():
            r = min(float(rate), (1 + k) / (10 + k)) if self.warmup else float(rate)
            torch._foreach_lerp_(shadow, current, 1.0 - r)

    def state_dicts(self, model: nn.Module) -> dict[str, dict[str, Tensor]]:
        """{rate: full model state dict with the averaged parameters} (CPU tensors)."""
        base = _cpu_state(model)
        return {rate: {**base, **{n: s.detach().cpu() for n, s in zip(self.names, shadow)}}
                for rate, shadow in self.shadows.items()}

    @torch.no_grad()
    def load(self, states: dict[str, dict[str, Tensor]]) -> None:
        missing = set(self.shadows) - set(states)
        if missing:
            raise DebiasError(f"checkpoint has no EMA at rate {sorted(missing)[0]}")
        for rate, shadow in self.shadows.items():
            torch._foreach_copy_(shadow, [states[rate][n] for n in self.names])


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- metrics logs

class MetricLogs:
    """``train_log.tsv`` rows and the whole-run ``timestep_loss.tsv``, from on-device float64 sums.

    Nothing here synchronises with the host except :meth:`write_row` / :meth:`state` (log and
    checkpoint steps). Sums are per rank; rows and states use their all-reduced totals, and a
    resumed run puts the saved totals on rank 0 only so that the totals stay global. The rows
    written so far travel in the checkpoint, so a resumed run rewrites the log exactly as an
    uninterrupted run has it, even if the file was lost or holds rows past the checkpoint.
    """

    def __init__(self, log_dir: Path, num_timesteps: int, device: torch.device, ranks: Ranks):
        self.log_dir, self.num_timesteps, self.ranks = log_dir, num_timesteps, ranks
        self.interval = torch.zeros(3, dtype=torch.float64, device=device)   # Σ loss, Σ mse, Σ vb
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)  # Σ over steps (same on all ranks)
        self.interval_steps = 0
        self.buckets = torch.zeros(BUCKETS, 3, dtype=torch.float64, device=device)  # Σ loss, Σ mse, count
        self.last_loss: float | None = None
        self.rows: list[str] = []  # train_log.tsv rows so far (rank 0)

    @torch.no_grad()
    def accumulate(self, loss: Tensor, mse: Tensor, vb: Tensor, t: Tensor, grad_norm: Tensor) -> None:
        """Per-sample terms (b,) and timesteps (b,) of this rank's micro-batch; the step's grad norm ()."""
        self.interval += torch.stack([loss.sum(), mse.sum(), vb.sum()]).double()
        self.grad_norm += grad_norm.double()
        self.interval_steps += 1
        rows = torch.stack([loss, mse, torch.ones_like(loss)], dim=1).double()
        self.buckets.index_add_(0, timestep_buckets(t, self.num_timesteps, BUCKETS), rows)

    def write_row(self, step: int, lr: float, images_per_s: float, batch_size: int) -> None:
        """Append the mean over the steps since the last row (all ranks must call this)."""
        sums = _reduced(self.interval, self.ranks).tolist()
        count = self.interval_steps * batch_size
        loss, mse, vb = (s / count for s in sums)
        grad_norm = self.grad_norm.item() / self.interval_steps
        self.interval.zero_()
        self.grad_norm.zero_()
        self.interval_steps = 0
        self.last_loss = loss
        buckets = _reduced(self.buckets, self.ranks)
        if self.ranks.main:
            self.rows.append("\t".join(_fmt(v) for v in (step, loss, mse, vb, grad_norm, lr, images_per_s)))
            _append_line(self.log_dir / TRAIN_LOG, self.rows[-1])
            self._write_buckets(buckets)

    def _write_buckets(self, buckets: Tensor) -> None:
        """One row per bucket of t: first and last t, mean loss and mse over the run, sample count."""
        index = timestep_buckets(torch.arange(self.num_timesteps), self.num_timesteps, BUCKETS)
        lines = ["t_start\tt_end\tloss\tmse\tcount"]
        for b, (loss, mse, count) in enumerate(buckets.tolist()):
            ts = (index == b).nonzero().flatten().tolist()
            if ts:
                mean = (lambda s: s / count) if count else (lambda s: float("nan"))
                lines.append("\t".join(_fmt(v) for v in (ts[0], ts[-1], mean(loss), mean(mse), int(count))))
        atomic_write(self.log_dir / TIMESTEP_LOG, lambda f: f.write("\n".join(lines) + "\n"), mode="w")

    def state(self) -> dict:
        """Global totals for a checkpoint (all ranks must call this)."""
        return {"interval": _reduced(self.interval, self.ranks).cpu(), "grad_norm": self.grad_norm.cpu(),
                "interval_steps": self.interval_steps, "buckets": _reduced(self.buckets, self.ranks).cpu(),
                "last_loss": self.last_loss, "rows": list(self.rows)}

    def load_state(self, state: dict) -> None:
        if self.ranks.main:
            self.interval.copy_(state["interval"])
            self.buckets.copy_(state["buckets"])
            self.rows = list(state["rows"])
        self.grad_norm.copy_(state["grad_norm"])
        self.interval_steps = int(state["interval_steps"])
        self.last_loss = state["last_loss"]

    def start(self) -> None:
        """Rank 0: rewrite ``train_log.tsv`` with the rows so far (none for a fresh run)."""
        lines = ["\t".join(LOG_COLUMNS), *self.rows]
        atomic_write(self.log_dir / TRAIN_LOG, lambda f: f.write("\n".join(lines) + "\n"), mode="w")
        if not self.rows:
            (self.log_dir / TIMESTEP_LOG).unlink(missing_ok=True)


def _fmt(v: float | int) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def _append_line(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- checkpoints

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_change(saved: dict, cfg: Config) -> str | None:
    """The first training-relevant key whose value differs from a checkpoint's config, as 'key: old → new'."""
    old = _flatten({k: saved.get(k) for k in TRAINING_SECTIONS})
    new = _flatten({k: v for k, v in cfg.to_dict().items() if k in TRAINING_SECTIONS})
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} → {new.get(key)!r}"
    return None


def _resume_point(out_dir: Path, cfg: Config, unet_kwargs: dict, size: int, resume: bool) -> Checkpoint | None:
    """The checkpoint to continue from, or None to start over (rank 0 only)."""
    path = out_dir / CHECKPOINT
    if not resume or not path.exists():
        return None
    ckpt = load_checkpoint(path)
    change = config_change(ckpt.config, cfg)
    if change is None and ckpt.unet_kwargs != unet_kwargs:
        change = "the model's shape"
    if change is None and ckpt.extra.get("dataset_size") != size:
        change = f"dataset size: {ckpt.extra.get('dataset_size')} → {size}"
    if change is not None:
        log.warning("warning: %s was trained with another configuration (%s); starting over", path, change)
        return None
    if ckpt.step > cfg.train.steps:
        raise DebiasError(f"{path} is at step {ckpt.step}, beyond train.steps={cfg.train.steps}; "
                          "raise train.steps or use --no-resume")
    return ckpt


def _share(obj, ranks: Ranks):
    """Rank 0's ``obj`` on every rank."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_main(compute: Callable, ranks: Ranks, share: bool = True):
    """``compute()`` on rank 0, its result shared with every rank if ``share`` (else None elsewhere);
    its DebiasError is raised on every rank, so that no rank waits forever for one that failed."""
    result, error = None, None
    if ranks.main:
        try:
            result = compute()
        except DebiasError as err:
            error = str(err)
    error = _share(error, ranks)
    if error is not None:
        raise DebiasError(error)
    return _share(result, ranks) if share else result


def _lock(out_dir: Path):
    """An advisory lock on ``out_dir`` (an open file; closing it releases the lock), so two runs never
    write the same files. None where the platform has no flock."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        return None
    lock = open(out_dir / ".train.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DebiasError(f"another training run is writing to {out_dir}") from None
    return lock


def _remove_leftovers(out_dir: Path, log_dir: Path, fresh: bool) -> None:
    """Temporary files of a killed writer; for a fresh run also the old checkpoint and snapshots."""
    snapshots = out_dir / SNAPSHOT_DIR
    for folder, name in ((out_dir, CHECKPOINT), (snapshots, "step_*"), (log_dir, TRAIN_LOG), (log_dir, TIMESTEP_LOG)):
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    if fresh:
        (out_dir / CHECKPOINT).unlink(missing_ok=True)
        for old in snapshots.glob("step_*.pt"):
            old.unlink()


def export_model(checkpoint_dir: str | Path, model_path: str | Path, snapshots_dir: str | Path | None = None) -> None:
    """Write the finished run's weights, EMAs and config (no optimizer or RNG state) to ``model_path``,
    and copy its snapshots into ``snapshots_dir`` (replacing what was there)."""
    checkpoint_dir = Path(checkpoint_dir)
    ckpt = load_checkpoint(checkpoint_dir / CHECKPOINT)
    save_checkpoint(model_path, Checkpoint(config=ckpt.config, unet_kwargs=ckpt.unet_kwargs, model=ckpt.model,
                                           ema=ckpt.ema, step=ckpt.step))
    if snapshots_dir is not None:
        snapshots_dir = Path(snapshots_dir)
        snapshots_dir.mkdir(parents=True, exist_ok=True)
        for old in snapshots_dir.glob("step_*.pt"):
            old.unlink()
        for snap in sorted((checkpoint_dir / SNAPSHOT_DIR).glob("step_*.pt")):
            atomic_write(snapshots_dir / snap.name, lambda f, src=snap: _copy_into(src, f))


def _copy_into(src: Path, dst) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, dst)


# --------------------------------------------------------------------------- the loop

def _schedule_on(schedule: Schedule, device: torch.device) -> Schedule:
    """Move every table of a schedule to ``device`` once, so gathering in the loss never copies (or syncs)."""
    for name, value in vars(schedule).items():
        if isinstance(value, Tensor):
            setattr(schedule, name, value.to(device))
    return schedule


def _precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if precision == "fp16" and device.type != "cuda":
        log.warning("warning: train.precision=fp16 needs CUDA; using bf16 autocast on %s", device.type)
        precision = "bf16"
    return AUTOCAST_DTYPES[precision], precision == "fp16"


def _progress_bar(enabled: bool, total: int, start: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[status]}"), console=console,
                   disable=not (enabled and console.is_terminal))
    task = bar.add_task("train", total=total, completed=start, status="")
    return bar, task


class Trainer:
    """The state of one run: model, optimizer, EMA, generators and logs, plus one :meth:`step`."""

    def __init__(self, cfg: Config, dataset: ImageDataset, unet_kwargs: dict, device: torch.device, ranks: Ranks,
                 log_dir: Path):
        self.cfg, self.device, self.ranks = cfg, device, ranks
        tc = cfg.train
        if tc.batch_size % ranks.world:
            raise DebiasError(f"train.batch_size={tc.batch_size} is not divisible by the {ranks.world} processes")
        self.micro = slice(ranks.rank * tc.batch_size // ranks.world, (ranks.rank + 1) * tc.batch_size // ranks.world)
        small = dataset.images.element_size() * dataset.images.nelement() <= 2**31
        data_device = device if small else torch.device("cpu")
        self.images = dataset.images.to(data_device)
        self.labels = dataset.labels.to(data_device) if cfg.data.class_cond else None
        self.sampler = EpochSampler(len(dataset), tc.batch_size, cfg.seed, data_device)

        torch.manual_seed(cfg.seed)
        self.model = UNetModel(**unet_kwargs).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay,
                                           **({"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}))
        self.autocast_dtype, use_scaler = _precision(tc.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        self.ema = EMA(self.model, tc.ema_rates, tc.ema_warmup)
        self.generators = make_generators(cfg.seed, device)

        self.schedule = _schedule_on(Schedule.named(cfg.diffusion.schedule, cfg.diffusion.steps), device)
        self.weights = loss_weights(cfg.weighting, self.schedule.snr, cfg.target, cfg.loss).to(device)
        self.logs = MetricLogs(log_dir, self.schedule.num_timesteps, device, ranks)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first step with a non-finite loss
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)    # on-device copy of the step
        self.forward = self._wrap_model()

    def _wrap_model(self) -> Callable:
        model: nn.Module = self.model
        if self.ranks.world > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # static shapes: a shape change recompiles instead of tracing symbolic sizes, which inductor
        # (torch 2.14, CPU, bf16) failed to lower for this UNet ('cannot determine truth value of Relational')
        return torch.compile(model, dynamic=False) if self.cfg.train.compile else model

    def lr_at(self, k: int) -> float:
        """Linear warm-up over ``train.warmup_steps`` updates, then constant."""
        tc = self.cfg.train
        return tc.lr * min(1.0, (k + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr

    def _batch(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """This rank's slice of global batch k: x0, noise (b, C, H, W), t (b,), labels (b,) or None."""
        B = self.cfg.train.batch_size
        idx = self.sampler.batch(k)[self.micro]
        x0 = self.images[idx].to(self.device, non_blocking=True)
        if self.cfg.data.random_flip:
            flip = torch.rand(B, generator=self.generators["flip"], device=self.device)[self.micro] < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=self.generators["timesteps"],
                          device=self.device)[self.micro]
        noise = torch.randn((B, *x0.shape[1:]), generator=self.generators["noise"], device=self.device)[self.micro]
        y = self.labels[idx].to(self.device, non_blocking=True) if self.labels is not None else None
        return x0, noise, t, y

    def step(self, k: int) -> None:
        """Update k (0-based): one optimizer step on global batch k, then the EMAs. No host syncs."""
        lr = self.lr_at(k)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x0, noise, t, y = self._batch(k)
        xt = self.schedule.q_sample(x0, t, noise)
        if self.device.type == "cuda":
            xt = xt.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.forward(xt, t, y)
        terms = diffusion_loss(self.schedule, out.float(), x0, noise, t, self.cfg.target, self.weights,
                               self.cfg.model.learn_sigma)
        loss = terms.loss.mean()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip or math.inf, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            finite = torch.isfinite(loss)  # inf gradients are the scaler's business (it skips the step)
        else:
            self.optimizer.step()
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(k)
        self.step_count += 1
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, self.step_count, self.first_bad)
        self.logs.accumulate(terms.loss.detach(), terms.mse.detach(), terms.vb.detach(), t, grad_norm.detach())

    def first_bad_step(self) -> int | None:
        """The first step with a non-finite loss on any rank, or None (a host sync)."""
        bad = self.first_bad.clone()
        if self.ranks.world > 1:
            bad = torch.where(bad < 0, torch.iinfo(torch.int64).max, bad)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            bad = torch.where(bad == torch.iinfo(torch.int64).max, -1, bad)
        value = int(bad.item())
        return None if value < 0 else value

    # ---- checkpoint state

    def rng_state(self) -> dict[str, Tensor]:
        state = {name: g.get_state() for name, g in self.generators.items()}
        state["torch_cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            state["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def checkpoint(self, step: int, unet_kwargs: dict, log_state: dict | None = None) -> Checkpoint:
        """The run at ``step``: weights and EMAs; with ``log_state`` (:meth:`MetricLogs.state`) also the
        optimizer, RNG and log state needed to resume."""
        ckpt = Checkpoint(config=self.cfg.to_dict(), unet_kwargs=unet_kwargs, model=_cpu_state(self.model),
                          ema=self.ema.state_dicts(self.model), step=step)
        if log_state is not None:
            epoch, position = self.sampler.position(step)
            ckpt.optimizer = self.optimizer.state_dict()
            ckpt.scaler = self.scaler.state_dict() if self.scaler is not None else None
            ckpt.rng = self.rng_state()
            ckpt.extra = {"logs": log_state, "dataset_size": self.sampler.size, "epoch": epoch, "position": position}
        return ckpt

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict(ckpt.model)
        self.ema.load(ckpt.ema)
        self.optimizer.load_state_dict(ckpt.optimizer)
        if self.scaler is not None and ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        for name, g in self.generators.items():
            g.set_state(ckpt.rng[name])
        torch.set_rng_state(ckpt.rng["torch_cpu"])
        if self.device.type == "cuda" and "torch_cuda" in ckpt.rng:
            torch.cuda.set_rng_state(ckpt.rng["torch_cuda"], self.device)
        self.logs.load_state(ckpt.extra["logs"])
        self.step_count.fill_(ckpt.step)


def train(cfg: Config, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
          stop_after: int | None = None, on_step: Callable[[int], None] | None = None,
          dataset: ImageDataset | None = None, log_dir: str | Path | None = None) -> TrainResult:
    """Train ``cfg`` into ``out_dir``, continuing from ``out_dir/checkpoint.pt`` when ``resume``.

    A finished run (checkpoint at ``train.steps``) returns at once. ``stop_after`` stops after that
    global step as a kill would (tests); ``on_step(step)`` is called after every step; ``dataset``
    replaces ``load_dataset(cfg.data)``; ``log_dir`` (default ``out_dir``) receives the TSV logs.
    Under torchrun (WORLD_SIZE > 1) every rank calls this and rank 0 writes the files.
    Raises :class:`DebiasError` for bad input, a locked ``out_dir``, or a non-finite loss.
    """
    ranks, device = _setup_processes(cfg.train.devices)
    try:
        return _train(cfg, Path(out_dir), Path(log_dir or out_dir), ranks, device, resume, progress, stop_after,
                      on_step, dataset)
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


def _train(cfg: Config, out_dir: Path, log_dir: Path, ranks: Ranks, device: torch.device, resume: bool,
           progress: bool, stop_after: int | None, on_step: Callable[[int], None] | None,
           dataset: ImageDataset | None) -> TrainResult:
    began = time.perf_counter()
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    if cfg.data.class_cond and dataset.labels is None:
        raise DebiasError(f"data.class_cond: dataset {cfg.data.name!r} has no class labels")
    try:
        unet_kwargs = unet_kwargs_for(cfg, dataset.num_classes)
    except ValueError as err:
        raise DebiasError(f"model: {err}") from None
    path = out_dir / CHECKPOINT
    lock = _on_main(lambda: _lock(out_dir), ranks, share=False)
    try:
        ckpt = _on_main(lambda: _resume_point(out_dir, cfg, unet_kwargs, len(dataset), resume), ranks)
        start = ckpt.step if ckpt is not None else 0
        if ckpt is not None and start == cfg.train.steps:
            return TrainResult(path, start, start, ckpt.extra.get("logs", {}).get("last_loss"),
                               time.perf_counter() - began, ranks.main)
        enable_fast_math(device)
        trainer = Trainer(cfg, dataset, unet_kwargs, device, ranks, log_dir)
        if ckpt is not None:
            trainer.restore(ckpt)
        del ckpt
        if ranks.main:
            log_dir.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(out_dir, log_dir, fresh=start == 0)
            trainer.logs.start()
        step = _loop(trainer, cfg, out_dir, unet_kwargs, start, progress, stop_after, on_step)
    finally:
        if lock is not None:
            lock.close()
    return TrainResult(path, step, start, trainer.logs.last_loss, time.perf_counter() - began, ranks.main)


def _loop(trainer: Trainer, cfg: Config, out_dir: Path, unet_kwargs: dict, start: int, progress: bool,
          stop_after: int | None, on_step: Callable[[int], None] | None) -> int:
    """Steps ``start`` … ``train.steps`` with logging, snapshots and checkpoints; returns the last step."""
    tc, main = cfg.train, trainer.ranks.main
    end = tc.steps if stop_after is None else max(start, min(tc.steps, stop_after))
    snapshot_steps = set(tc.snapshot_steps)
    bar, task = _progress_bar(progress and main, tc.steps, start)
    timer, timed_steps, step = time.perf_counter(), 0, start
    with bar:
        for k in range(start, end):
            trainer.step(k)
            step, timed_steps = k + 1, timed_steps + 1
            due_log = step % tc.log_every == 0 or step == tc.steps
            due_snapshot = step in snapshot_steps
            due_checkpoint = step % tc.checkpoint_every == 0 or step == tc.steps
            if due_log or due_snapshot or due_checkpoint:
                _stop_if_non_finite(trainer, out_dir)
            if due_log:
                now = time.perf_counter()
                speed = timed_steps * tc.batch_size / (now - timer)
                trainer.logs.write_row(step, trainer.lr_at(k), speed, tc.batch_size)
                timer, timed_steps = now, 0
                bar.update(task, status=f"loss {trainer.logs.last_loss:.4f} · {speed:.0f} img/s")
            if due_snapshot and main:
                save_checkpoint(out_dir / SNAPSHOT_DIR / f"step_{step:07d}.pt", trainer.checkpoint(step, unet_kwargs))
            if due_checkpoint:
                log_state = trainer.logs.state()  # collective: every rank takes part
                if main:
                    save_checkpoint(out_dir / CHECKPOINT, trainer.checkpoint(step, unet_kwargs, log_state))
            bar.update(task, completed=step)
            if on_step is not None:
                on_step(step)
    return step


def _stop_if_non_finite(trainer: Trainer, out_dir: Path) -> None:
    bad = trainer.first_bad_step()
    if bad is not None:
        path = out_dir / CHECKPOINT
        kept = f"last good checkpoint kept at {path}" if path.exists() else "no checkpoint was written"
        raise DebiasError(f"non-finite loss at step {bad}; {kept}")


def relaunch_on_all_gpus(cfg: Config, module_args: list[str]) -> None:
    """With ``train.devices`` cuda/auto and several visible GPUs, replace this process by torchrun
    running ``python <module_args>`` once per GPU (DDP); otherwise return and train here."""
    if cfg.train.devices == "cpu" or "WORLD_SIZE" in os.environ or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if gpus > 1:
        os.execvp(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc-per-node={gpus}", *module_args])
