"""The training logs, written by rank 0 from all-reduced sums: ``train_log.tsv`` (a row every
``train.log_every`` steps), ``timestep_loss.tsv`` (the loss over the run per bucket of timesteps), and
the same through DVCLive in ``dvclive/`` — step, loss, unweighted MSE and images/s as metrics (what
``dvc exp show`` lists, live while a run trains) and plots, the per-timestep loss as a plot, and the
weighting per timestep as a plot (``weighting``: the applied weight w(t)/e^{u(t)} and the learned u(t)
of ``weighting: learned``, 0 for a fixed weighting).

DVCLive is optional for training outside the pipeline: without it installed, the TSV logs are written
as always and the DVCLive logs are skipped (one ``note:`` line says so)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from debias.diffusion.losses import timestep_buckets
from debias.errors import DebiasError
from debias.io import atomic_write
from debias.runtime import Ranks, all_reduced

TRAIN_LOG = "train_log.tsv"
TIMESTEP_LOG = "timestep_loss.tsv"
LIVE_DIR = "dvclive"
LOG_COLUMNS = ("step", "loss", "mse", "vb", "grad_norm", "lr", "images_per_s")
LIVE_METRICS = ("loss", "mse", "images_per_s")  # with DVCLive's step: the training columns of `dvc exp show`
BUCKETS = 10

log = logging.getLogger(__name__)


class MetricLogs:
    """``train_log.tsv`` rows and the whole-run ``timestep_loss.tsv``, from on-device float64 sums.

    Nothing here synchronises with the host except :meth:`write_row` / :meth:`state` (log and
    checkpoint steps). Sums are per rank; rows and states use their all-reduced totals, and a
    resumed run puts the saved totals on rank 0 only so that the totals stay global. The rows
    written so far travel in the checkpoint, so a resumed run rewrites the log exactly as an
    uninterrupted run has it, even if the file was lost or holds rows past the checkpoint.
    """

    def __init__(self, log_dir: Path, num_timesteps: int, device: torch.device, ranks: Ranks,
                 weights: Tensor | None = None):
        self.log_dir, self.num_timesteps, self.ranks = log_dir, num_timesteps, ranks
        self.weights = None if weights is None else weights.detach().double().cpu()  # (T,) on the target's MSE
        self.u: Tensor | None = None  # (T,) the learned u(t) at the last row
        self.interval = torch.zeros(3, dtype=torch.float64, device=device)   # Σ loss, Σ mse, Σ vb
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)  # Σ over steps (same on all ranks)
        self.interval_steps = 0
        self.buckets = torch.zeros(BUCKETS, 3, dtype=torch.float64, device=device)  # Σ loss, Σ mse, count
        self.last_loss: float | None = None
        self.rows: list[str] = []  # train_log.tsv rows so far (rank 0)
        self.live = None  # the DVCLive logger (rank 0, from start(); stays None without dvclive installed)

    @torch.no_grad()
    def accumulate(self, loss: Tensor, mse: Tensor, vb: Tensor, t: Tensor, grad_norm: Tensor) -> None:
        """Per-sample terms (b,) and timesteps (b,) of this rank's micro-batch; the step's grad norm ()."""
        self.interval += torch.stack([loss.sum(), mse.sum(), vb.sum()]).double()
        self.grad_norm += grad_norm.double()
        self.interval_steps += 1
        rows = torch.stack([loss, mse, torch.ones_like(loss)], dim=1).double()
        self.buckets.index_add_(0, timestep_buckets(t, self.num_timesteps, BUCKETS), rows)

    def write_row(self, step: int, lr: float, images_per_s: float, batch_size: int, u: Tensor | None = None) -> None:
        """Append the mean over the steps since the last row (all ranks must call this); ``u`` (T,) is the
        learned u(t) now (None: a fixed weighting)."""
        sums = all_reduced(self.interval, self.ranks).tolist()
        count = self.interval_steps * batch_size
        loss, mse, vb = (s / count for s in sums)
        grad_norm = self.grad_norm.item() / self.interval_steps
        self.interval.zero_()
        self.grad_norm.zero_()
        self.interval_steps = 0
        self.last_loss = loss
        buckets = all_reduced(self.buckets, self.ranks)
        if self.ranks.main:
            self.rows.append("\t".join(_fmt(v) for v in (step, loss, mse, vb, grad_norm, lr, images_per_s)))
            _append_line(self.log_dir / TRAIN_LOG, self.rows[-1])
            self._live_row(self.rows[-1])
            if self.live is not None:
                self.live.make_summary()
            self._write_buckets(buckets)
            self.u = None if u is None else u.detach().double().cpu()
            self._write_weighting()

    def _write_weighting(self) -> None:
        """The applied weight w(t)/e^{u(t)} and u(t) at (at most 1000) timesteps."""
        if self.weights is None or self.live is None:
            return
        u = self.u if self.u is not None else torch.zeros_like(self.weights)
        stride = max(1, self.num_timesteps // 1000)
        points = [{"t": t, "weight": float(self.weights[t] * torch.exp(-u[t])), "u": float(u[t])}
                  for t in range(0, self.num_timesteps, stride)]
        self.live.log_plot("weighting", points, x="t", y="weight", template="linear",
                           title="applied weight w(t)/e^u(t) on the target's MSE", x_label="t", y_label="weight")

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
        if self.live is None:
            return
        points = [dict(zip(("t_start", "t_end", "loss", "mse", "count"), map(float, line.split("\t"))))
                  for line in lines[1:]]
        self.live.log_plot("timestep_loss", points, x="t_start", y="mse", template="linear",
                           title="unweighted MSE per timestep bucket (the whole run)", x_label="t", y_label="MSE")

    def state(self) -> dict:
        """Global totals for a checkpoint (all ranks must call this)."""
        return {"interval": all_reduced(self.interval, self.ranks).cpu(), "grad_norm": self.grad_norm.cpu(),
                "interval_steps": self.interval_steps, "buckets": all_reduced(self.buckets, self.ranks).cpu(),
                "last_loss": self.last_loss, "rows": list(self.rows), "u": self.u}

    def load_state(self, state: dict) -> None:
        if self.ranks.main:
            self.interval.copy_(state["interval"])
            self.buckets.copy_(state["buckets"])
            self.rows = list(state["rows"])
        self.grad_norm.copy_(state["grad_norm"])
        self.interval_steps = int(state["interval_steps"])
        self.last_loss = state["last_loss"]
        self.u = state.get("u")

    def start(self) -> None:
        """Rank 0: rewrite ``train_log.tsv`` and ``dvclive/`` with the rows so far (none for a fresh run),
        so that a resumed run logs every step exactly once, whatever a killed run left behind. Without
        dvclive installed, ``dvclive/`` is skipped (a note says so) and the TSV logs are written alone."""
        lines = ["\t".join(LOG_COLUMNS), *self.rows]
        atomic_write(self.log_dir / TRAIN_LOG, lambda f: f.write("\n".join(lines) + "\n"), mode="w")
        try:
            from dvclive import Live
        except ImportError:
            self.live = None
            log.warning("note: dvclive is not installed; the DVCLive logs (%s/) are skipped, %s and %s are written",
                        self.log_dir / LIVE_DIR, TRAIN_LOG, TIMESTEP_LOG)
        else:
            self.live = Live(str(self.log_dir / LIVE_DIR), resume=False, save_dvc_exp=False, dvcyaml=None,
                             report=None)
        for row in self.rows:
            self._live_row(row)
        if self.rows:
            if self.live is not None:
                self.live.make_summary()
            self._write_buckets(self.buckets)
            self._write_weighting()
        else:
            (self.log_dir / TIMESTEP_LOG).unlink(missing_ok=True)

    def _live_row(self, row: str) -> None:
        if self.live is None:
            return
        values = dict(zip(LOG_COLUMNS, row.split("\t")))
        self.live.step = int(values["step"])
        for name in LIVE_METRICS:
            self.live.log_metric(name, float(values[name]))


def _fmt(v: float | int) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def _append_line(path: Path, line: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # the rows so far travel in the checkpoint: a resumed run rewrites the file
        raise DebiasError(f"cannot write {path}: {err.strerror or err}") from None
