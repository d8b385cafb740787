"""The training loop: one recipe (target × weighting) on one dataset, resumable bit for bit.

Timesteps, noise and flips are drawn for the whole global batch from checkpointed generators
(:mod:`debias.train.state`) and sliced by rank, and the data order depends only on (seed, step). A
run killed at any moment and restarted therefore ends with the same weights as an uninterrupted one
(bitwise on CPU), and N processes under torchrun compute the same gradients as one process with
the same global batch (up to reduction order); SIGINT/SIGTERM stops it after a step all ranks agree on, with a
checkpoint there (:mod:`debias.stopping`). Files (rank 0 only): :mod:`debias.train.rundir`
(checkpoints every ``train.checkpoint_every`` steps and at the end, snapshots at
``train.snapshot_steps``) and :mod:`debias.train.logs`.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from debias.checkpoints import Checkpoint, save_checkpoint
from debias.config import Config
from debias.data.batches import training_batches
from debias.data.prepared import PreparedSet
from debias.data.sets import ImageDataset
from debias.diffusion.densities import TimestepDensity
from debias.diffusion.objective import Objective, recipe_weight_table
from debias.diffusion.schedule import Schedule
from debias.diffusion.uncertainty import UncertaintyHead, WithUncertainty
from debias.errors import DebiasError, Interrupted, one_line
from debias.limits import training_notes
from debias.models.factory import unet_kwargs_for
from debias.models.unet import UNetModel
from debias.progress import Progress
from debias.runtime import Ranks, autocast_dtype, compile_static, on_main, prepare_network, processes
from debias.stopping import AgreedStop
from debias.train.logs import MetricLogs
from debias.train.rundir import RunDir
from debias.train.state import EMA, cpu_state, ema_decays, make_generators

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` did: the checkpoint it left, the step it reached and where it started."""

    checkpoint: Path
    step: int
    start_step: int
    loss: float | None          # the last logged mean loss (None if nothing was ever logged)
    seconds: float
    is_main_process: bool = True


class Trainer:
    """The state of one run: model, optimizer, EMA, generators and logs around the objective, plus one
    :meth:`step`."""

    def __init__(self, cfg: Config, dataset: ImageDataset | PreparedSet, unet_kwargs: dict, device: torch.device,
                 ranks: Ranks, logs: MetricLogs):
        self.cfg, self.device, self.ranks, self.unet_kwargs, self.logs = cfg, device, ranks, unet_kwargs, logs
        tc = cfg.train
        if tc.batch_size % ranks.world:
            raise DebiasError(f"train.batch_size={tc.batch_size} is not divisible by the {ranks.world} processes")
        self.micro = slice(ranks.rank * tc.batch_size // ranks.world, (ranks.rank + 1) * tc.batch_size // ranks.world)
        self.batches = training_batches(dataset, dataset.labels if cfg.data.class_cond else None, tc.data_loading,
                                        cfg.seed, tc.batch_size, self.micro, device, tc.num_workers)

        torch.manual_seed(cfg.seed)
        self.model = prepare_network(UNetModel(**unet_kwargs), device)
        # weighting: learned — EDM2's u(λ), inside the module that DDP wraps (its gradients averaged with the rest)
        head = UncertaintyHead().to(device) if cfg.weighting == "learned" else None
        self.schedule = Schedule.named(cfg.diffusion.schedule, cfg.diffusion.steps).to(device)
        self.log_snr = self.schedule.snr.log().to(device)
        self.network = WithUncertainty(self.model, head, self.log_snr)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                           **({"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}))
        self.autocast_dtype = autocast_dtype(tc.precision, device, fallback=True)
        self.scaler = torch.amp.GradScaler(device.type) if self.autocast_dtype == torch.float16 else None
        self.ema = EMA(self.model, ema_decays(tc.ema, tc.ema_rates, tc.ema_warmup, tc.phema_std))
        self.generators = make_generators(cfg.seed, device)
        self.density = TimestepDensity(tc.timestep_sampler, self.log_snr, device, ranks, tc.timestep_loc,
                                       tc.timestep_scale)
        self.objective = Objective(cfg, self.schedule, self.density, self.micro)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first step with a non-finite loss
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)    # on-device copy of the step
        self.forward = self._wrap_network()

    def _wrap_network(self) -> Callable:
        """``forward(x_t, t, y)`` → (output, u): the (DDP-wrapped, compiled) network, channels-last on CUDA,
        under the run's autocast."""
        network: nn.Module = self.network
        if self.ranks.world > 1:  # broadcast_buffers: log_snr and the head's features are the same on every rank
            network = nn.parallel.DistributedDataParallel(
                network, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False)
        network = compile_static(network) if self.cfg.train.compile else network
        device_type, dtype = self.device.type, self.autocast_dtype

        def forward(xt: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
            if device_type == "cuda":
                xt = xt.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                return network(xt, t, y)

        return forward

    def lr_at(self, k: int) -> float:
        """Linear warm-up over ``train.warmup_steps`` updates, then constant."""
        tc = self.cfg.train
        return tc.lr * min(1.0, (k + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr

    def batch(self, k: int) -> tuple[Tensor, Tensor | None]:
        """This rank's slice of global batch k: x0 (b, C, H, W), randomly flipped if asked, and labels (b,) or None."""
        x0, y = self.batches.get(k)
        if self.cfg.data.random_flip:
            B = self.cfg.train.batch_size
            flip = torch.rand(B, generator=self.generators["flip"], device=self.device)[self.micro] < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        return x0, y

    def step(self, k: int) -> None:
        """Update k (0-based): one optimizer step on global batch k, then the EMAs. No host syncs."""
        lr = self.lr_at(k)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x0, y = self.batch(k)
        terms, t = self.objective(self.forward, x0, y, self.generators)
        loss = terms.loss.mean()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.network.parameters(), self.cfg.train.grad_clip or math.inf,
                                             foreach=True)
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

    @torch.no_grad()
    def learned_u(self) -> Tensor | None:
        """u(t) (T,) of the uncertainty head on the CPU (None for a fixed weighting)."""
        head = self.network.head
        return None if head is None else head(self.log_snr).cpu()

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

    def checkpoint(self, step: int, log_state: dict | None = None) -> Checkpoint:
        """The run at ``step``: weights and EMAs; with ``log_state`` (:meth:`MetricLogs.state`) also the
        optimizer, RNG and log state needed to resume."""
        ckpt = Checkpoint(config=self.cfg.to_dict(), unet_kwargs=self.unet_kwargs, model=cpu_state(self.model),
                          ema=self.ema.state_dicts(self.model), step=step)
        if self.network.head is not None:
            ckpt.extra["uncertainty"] = cpu_state(self.network.head)
        if log_state is not None:
            epoch, position = self.batches.order.position(step)
            ckpt.optimizer = self.optimizer.state_dict()
            ckpt.scaler = self.scaler.state_dict() if self.scaler is not None else None
            ckpt.rng = self.rng_state()
            ckpt.extra |= {"logs": log_state, "dataset_size": self.batches.order.size, "epoch": epoch, "position": position,
                          "timesteps": self.density.state()}
        return ckpt

    def profiles(self, step: int) -> Checkpoint:
        """The power-function EMA profiles at ``step`` (``train.ema: phema``), for :mod:`debias.phema`."""
        ema = self.ema.state_dicts(self.model)
        return Checkpoint(config=self.cfg.to_dict(), unet_kwargs=self.unet_kwargs, model=next(iter(ema.values())),
                          ema=ema, step=step)

    def restore(self, ckpt: Checkpoint, source: Path) -> None:
        """Continue from ``ckpt`` (read from ``source``): a part that does not fit is one line naming it."""
        restore_part(source, "model", lambda: self.model.load_state_dict(ckpt.model))
        restore_part(source, "ema", lambda: self.ema.load(ckpt.ema))
        if self.network.head is not None:
            restore_part(source, "uncertainty", lambda: self.network.head.load_state_dict(ckpt.extra["uncertainty"]))
        restore_part(source, "optimizer", lambda: self.optimizer.load_state_dict(ckpt.optimizer))
        if self.scaler is not None and ckpt.scaler:
            restore_part(source, "scaler", lambda: self.scaler.load_state_dict(ckpt.scaler))

        def rng() -> None:
            for name, g in self.generators.items():
                g.set_state(ckpt.rng[name])
            torch.set_rng_state(ckpt.rng["torch_cpu"])
            if self.device.type == "cuda" and "torch_cuda" in ckpt.rng:
                torch.cuda.set_rng_state(ckpt.rng["torch_cuda"], self.device)

        restore_part(source, "rng", rng)
        restore_part(source, "logs", lambda: self.logs.load_state(ckpt.extra["logs"]))
        restore_part(source, "timesteps", lambda: self.density.load_state(ckpt.extra.get("timesteps") or {}))
        self.step_count.fill_(ckpt.step)

    # ---- the loop

    def fit(self, run: RunDir, start: int, end: int, progress: bool, stop: AgreedStop,
            on_step: Callable[[int], None] | None = None) -> int:
        """Steps ``start`` … ``end`` with logging, snapshots and checkpoints into ``run``, or until the ranks agree to
        ``stop`` (then with a checkpoint at that step); returns the last step."""
        tc, main = self.cfg.train, self.ranks.main
        snapshot_steps = set(tc.snapshot_steps)
        phema = tc.ema == "phema"
        timer, timed_steps, step = time.perf_counter(), 0, start
        with Progress("train", "steps", enabled=progress and main) as bar:
            bar.update(start, tc.steps)
            for k in range(start, end):
                self.step(k)
                step, timed_steps = k + 1, timed_steps + 1
                stopping = stop.after_step()
                due_log = step % tc.log_every == 0 or step == tc.steps
                due_snapshot = step in snapshot_steps
                due_profiles = phema and (step % tc.phema_every == 0 or step == tc.steps)
                due_checkpoint = step % tc.checkpoint_every == 0 or step == tc.steps or stopping
                if due_log or due_snapshot or due_checkpoint or due_profiles:
                    self._stop_if_non_finite(run)
                if due_log:
                    now = time.perf_counter()
                    speed = timed_steps * tc.batch_size / (now - timer)
                    self.logs.write_row(step, self.lr_at(k), speed, tc.batch_size, self.learned_u())
                    timer, timed_steps = now, 0
                    bar.update(step, tc.steps, status=f"loss {self.logs.last_loss:.4g}, {speed:.0f} images/s")
                if due_snapshot and main:
                    save_checkpoint(run.snapshot(step), self.checkpoint(step))
                if due_profiles and main:
                    save_checkpoint(run.phema_snapshot(step), self.profiles(step))
                if due_checkpoint:
                    log_state = self.logs.state()  # collective: every rank takes part
                    if main:
                        save_checkpoint(run.checkpoint, self.checkpoint(step, log_state))
                bar.update(step, tc.steps)
                if on_step is not None:
                    on_step(step)
                if stopping:
                    break
        return step

    def _stop_if_non_finite(self, run: RunDir) -> None:
        bad = self.first_bad_step()
        if bad is not None:
            kept = f"last good checkpoint kept at {run.checkpoint}" if run.checkpoint.exists() else \
                "no checkpoint was written"
            raise DebiasError(f"non-finite loss at step {bad}; {kept}")


def run_logs(cfg: Config, log_dir: Path, device: torch.device, ranks: Ranks) -> MetricLogs:
    """The logs of a run of ``cfg`` (:class:`~debias.train.logs.MetricLogs`), with the recipe's weight table."""
    schedule = Schedule.named(cfg.diffusion.schedule, cfg.diffusion.steps)
    return MetricLogs(log_dir, cfg.diffusion.steps, device, ranks, recipe_weight_table(cfg, schedule))


def restore_part(source: Path, part: str, restore: Callable[[], object]) -> None:
    """Run ``restore()``; the errors of a part of a checkpoint that does not fit (a wrong type, a
    missing key, a tensor of another shape) become one DebiasError line naming ``part``."""
    try:
        restore()
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        raise DebiasError(f"{source}: cannot resume from its '{part}' ({type(err).__name__}: "
                          f"{one_line(str(err))[:160]})") from None


def train(cfg: Config, out_dir: str | Path, dataset: ImageDataset | PreparedSet, *, resume: bool = True,
          progress: bool = True, stop_after: int | None = None, on_step: Callable[[int], None] | None = None,
          log_dir: str | Path | None = None) -> TrainResult:
    """Train ``cfg`` on ``dataset`` (in memory, or a prepared set read as a memory map) into ``out_dir``,
    continuing from ``out_dir/checkpoint.pt`` when ``resume``.

    A finished run (checkpoint at ``train.steps``) returns at once. ``stop_after`` stops after that
    global step as a kill would (tests); ``on_step(step)`` is called after every step; ``log_dir``
    (default ``out_dir``) receives the TSV logs.
    Under torchrun (WORLD_SIZE > 1) every rank calls this and rank 0 writes the files.
    Raises :class:`DebiasError` for bad input, a locked ``out_dir``, or a non-finite loss, and
    :class:`Interrupted` after SIGINT/SIGTERM, once the step the ranks agree on is checkpointed
    (:class:`debias.stopping.AgreedStop`).
    """
    began = time.perf_counter()
    run = RunDir(Path(out_dir), Path(log_dir or out_dir))
    with processes(cfg.train.devices) as (ranks, device):
        if cfg.data.class_cond and dataset.labels is None:
            raise DebiasError(f"data.class_cond: dataset {cfg.data.name!r} has no class labels")
        unet_kwargs = unet_kwargs_for(cfg, dataset.num_classes)
        with run.locked(ranks):
            ckpt = on_main(lambda: run.resume_point(cfg, unet_kwargs, len(dataset), resume), ranks)
            start = ckpt.step if ckpt is not None else 0
            if ckpt is not None and ranks.main:
                log.info("note: %s: %s at step %d of %d", run.checkpoint,
                         "already trained" if start == cfg.train.steps else "resuming", start, cfg.train.steps)
            logs = run_logs(cfg, run.log_dir, device, ranks)
            if ckpt is not None and start == cfg.train.steps:
                saved = ckpt.extra.get("logs")
                restore_part(run.checkpoint, "logs", lambda: logs.load_state(saved))
                if ranks.main:  # the logs of this recipe, whatever another recipe left in log_dir
                    run.log_dir.mkdir(parents=True, exist_ok=True)
                    logs.start()
                return TrainResult(run.checkpoint, start, start, logs.last_loss, time.perf_counter() - began,
                                   ranks.main)
            trainer = Trainer(cfg, dataset, unet_kwargs, device, ranks, logs)
            if ckpt is not None:
                trainer.restore(ckpt, run.checkpoint)
            del ckpt
            if ranks.main:
                run.log_dir.mkdir(parents=True, exist_ok=True)
                run.remove_leftovers(fresh=start == 0)
                trainer.logs.start()
                for note in training_notes(cfg.train.steps, cfg.train.warmup_steps, cfg.train.snapshot_steps):
                    log.warning("%s", note)
            end = cfg.train.steps if stop_after is None else max(start, min(cfg.train.steps, stop_after))
            stop = AgreedStop(ranks)
            try:
                with stop.request:
                    step = trainer.fit(run, start, end, progress, stop, on_step)
            finally:
                trainer.batches.close()
                stop.close()
    if stop.signum is not None and step < end:  # (a signal during the last step lets the run end)
        raise Interrupted(stop.signum, f"interrupted ({signal.Signals(stop.signum).name}) at step {step} of "
                                       f"{cfg.train.steps}: {run.checkpoint} holds it; run the same command again "
                                       "to resume")
    return TrainResult(run.checkpoint, step, start, trainer.logs.last_loss, time.perf_counter() - began, ranks.main)
