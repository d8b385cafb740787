"""Training: exact resume (in process and after SIGKILL), DDP = one process, NaN stop, overfitting."""

import json
import math
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import debias.diffusion.objective as objective
from debias.checkpoints import load_checkpoint
from debias.diffusion.schedule import Schedule
from debias.diffusion.weighting import weight_table
from debias.config import config_from_dict
from debias.errors import DebiasError
from debias.train.logs import LIVE_DIR, TIMESTEP_LOG, TRAIN_LOG
from debias.data.datasets import load_dataset
from debias.train.loop import train as train_on
from debias.train.rundir import CHECKPOINT, export_model
from debias.data.order import DataOrder


def train(cfg, out_dir, **kwargs):
    """The training loop on the config's own dataset."""
    return train_on(cfg, out_dir, load_dataset(cfg.data), **kwargs)

# a tiny UNet and a short run; dropout, flips and labels so that every random stream is exercised
TINY = {
    "model": {"model_channels": 32, "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [8],
              "dropout": 0.1},
    "data": {"random_flip": True, "class_cond": True},
    "train": {"steps": 12, "batch_size": 16, "log_every": 3, "checkpoint_every": 5, "warmup_steps": 4,
              "ema_rates": [0.9, 0.999]},
}


def tiny(*overrides: str):
    return config_from_dict(TINY, overrides)


def assert_same_weights(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / CHECKPOINT), load_checkpoint(b / CHECKPOINT)
    assert ca.step == cb.step
    for name, value in ca.model.items():
        assert torch.equal(value, cb.model[name]), name
    for rate, state in ca.ema.items():
        for name, value in state.items():
            assert torch.equal(value, cb.ema[rate][name]), (rate, name)


def log_without_speed(path: Path) -> list[list[str]]:
    """The rows of train_log.tsv without images/s (wall-clock, so never equal)."""
    return [line.split("\t")[:-1] for line in (path / TRAIN_LOG).read_text().splitlines()]


def train_stop_and_resume(cfg, root: Path, stop_after: int):
    """Train ``cfg`` into root/full, and into root/split stopped after ``stop_after`` and resumed; both must
    end with the same weights and logs. Returns the uninterrupted run's result."""
    full = train(cfg, root / "full", progress=False)
    assert full.loss is not None and math.isfinite(full.loss)
    train(cfg, root / "split", progress=False, stop_after=stop_after)
    train(cfg, root / "split", progress=False)
    assert_same_weights(root / "full", root / "split")
    assert log_without_speed(root / "full") == log_without_speed(root / "split")
    return full


def test_epoch_sampler_covers_each_epoch_once():
    sampler = DataOrder(size=10, batch_size=4, seed=3, device=torch.device("cpu"))
    order = torch.cat([sampler.batch(k) for k in range(5)])  # 20 positions = 2 epochs, batches straddle them
    assert sorted(order[:10].tolist()) == list(range(10)) and sorted(order[10:].tolist()) == list(range(10))
    assert not torch.equal(order[:10], order[10:])
    assert torch.equal(DataOrder(10, 4, 3, torch.device("cpu")).batch(3), sampler.batch(3))
    assert sampler.position(3) == (1, 2)


def test_stop_and_resume_is_bitwise(tmp_path):
    cfg = tiny("train.snapshot_steps=[4,12]")
    full = train(cfg, tmp_path / "full", progress=False)
    assert (full.step, full.start_step) == (12, 0)
    first = train(cfg, tmp_path / "split", progress=False, stop_after=7)
    assert first.step == 7 and load_checkpoint(tmp_path / "split" / CHECKPOINT).step == 5
    (tmp_path / "split" / TRAIN_LOG).unlink()  # as `dvc repro` removes a stage's logs; the checkpoint has them
    second = train(cfg, tmp_path / "split", progress=False)
    assert (second.start_step, second.step) == (5, 12)
    assert_same_weights(tmp_path / "full", tmp_path / "split")
    assert log_without_speed(tmp_path / "full") == log_without_speed(tmp_path / "split")
    assert (tmp_path / "full" / TIMESTEP_LOG).read_text() == (tmp_path / "split" / TIMESTEP_LOG).read_text()
    steps = [int(row[0]) for row in log_without_speed(tmp_path / "full")[1:]]
    assert steps == [3, 6, 9, 12]
    buckets = (tmp_path / "full" / TIMESTEP_LOG).read_text().splitlines()
    assert buckets[0].split("\t") == ["t_start", "t_end", "loss", "mse", "count"] and len(buckets) == 11
    assert sum(int(line.split("\t")[-1]) for line in buckets[1:]) == 12 * 16


def test_snapshots_and_export(tmp_path):
    cfg = tiny("train.steps=4", "train.snapshot_steps=[2,4]")
    train(cfg, tmp_path / "ckpt", progress=False)
    snap = load_checkpoint(tmp_path / "ckpt" / "snapshots" / "step_0000002.pt")
    assert snap.step == 2 and set(snap.ema) == {"0.9", "0.999"} and snap.optimizer is None
    export_model(tmp_path / "ckpt", tmp_path / "models" / "model.pt", tmp_path / "models" / "snapshots")
    model = load_checkpoint(tmp_path / "models" / "model.pt")
    assert model.step == 4 and model.optimizer is None and model.rng == {}
    assert sorted(p.name for p in (tmp_path / "models" / "snapshots").iterdir()) == ["step_0000002.pt", "step_0000004.pt"]


def test_finished_run_is_a_noop(tmp_path):
    cfg = tiny("train.steps=3")
    train(cfg, tmp_path, progress=False)
    stamp = (tmp_path / CHECKPOINT).stat().st_mtime_ns
    again = train(cfg, tmp_path, progress=False)
    assert (again.start_step, again.step) == (3, 3) and again.loss is not None
    assert (tmp_path / CHECKPOINT).stat().st_mtime_ns == stamp


def test_changed_recipe_starts_over_and_short_steps_fail(tmp_path, caplog):
    train(tiny("train.steps=3"), tmp_path, progress=False)
    with pytest.raises(DebiasError, match="at step 3, beyond train.steps=2"):
        train(tiny("train.steps=2", "train.snapshot_steps=[2]"), tmp_path, progress=False)
    with caplog.at_level(logging.WARNING):
        result = train(tiny("train.steps=3", "weighting=p2"), tmp_path, progress=False)
    assert result.start_step == 0 and "(weighting: 'debias' → 'p2'); starting over" in caplog.text


def test_a_warmup_longer_than_training_is_a_note_at_the_start_and_from_debias_config(tmp_path, caplog):
    """train.warmup_steps above train.steps caps the learning rate (4 > 3: 75 % of train.lr at the last step)."""
    note = "note: train.warmup_steps=4 is above train.steps=3: the learning rate rises to 75% of train.lr and never " \
           "reaches it"
    with caplog.at_level(logging.INFO, logger="debias"):
        train(tiny("train.steps=3", "train.snapshot_steps=[]"), tmp_path, progress=False)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("note: train.")] == [note]
    from typer.testing import CliRunner

    from debias.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY))
    result = CliRunner().invoke(app, ["config", "-p", str(params), "-S", "train.steps=3", "-S", "train.snapshot_steps=[]"])
    assert result.exit_code == 0 and result.stderr.splitlines() == [note]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = objective.diffusion_loss, []

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 7:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(objective, "diffusion_loss", poisoned)
    with pytest.raises(DebiasError, match=r"non-finite loss at step 7; last good checkpoint kept at .*checkpoint\.pt"):
        train(tiny(), tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)
    assert ckpt.step == 5
    assert all(torch.isfinite(v).all() for v in ckpt.model.values())


def test_overfits_digits_with_the_default_model(tmp_path):
    cfg = config_from_dict({}, ["train.steps=60", "train.batch_size=32", "train.warmup_steps=10",
                                "train.log_every=10", "train.checkpoint_every=60"])
    result = train(cfg, tmp_path, progress=False)
    rows = [[float(x) for x in line.split("\t")] for line in (tmp_path / TRAIN_LOG).read_text().splitlines()[1:]]
    (_, first_loss, first_mse, *_), (_, last_loss, last_mse, *_) = rows[0], rows[-1]
    assert last_loss < 0.3 * first_loss and last_mse < 0.5 * first_mse
    assert result.loss == pytest.approx(last_loss, rel=1e-5)
    assert len((tmp_path / TIMESTEP_LOG).read_text().splitlines()) == 11


def cli(tmp_path: Path, out: Path, overrides: list[str], launcher: list[str] | None = None) -> list[str]:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY))
    sets = [arg for o in overrides for arg in ("--set", o)]
    return [*(launcher or [sys.executable]), "-m", "debias", "train", "--params", str(params), "--out", str(out),
            "--no-progress", *sets]


@pytest.mark.slow
def test_sigkill_and_rerun_is_bitwise(tmp_path):
    overrides = ["train.steps=50", "train.checkpoint_every=10", "train.log_every=7"]
    out = tmp_path / "killed"
    cmd = cli(tmp_path, out, overrides)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / CHECKPOINT).exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    proc.kill()
    proc.wait()
    killed_at = load_checkpoint(out / CHECKPOINT).step
    assert 0 < killed_at < 50, "the run was not killed mid-way"
    (out / f".{CHECKPOINT}.torn.tmp").write_bytes(b"half a checkpoint")  # what a kill mid-save leaves
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    train(config_from_dict(TINY, overrides), tmp_path / "reference", progress=False)
    assert_same_weights(out, tmp_path / "reference")
    assert log_without_speed(out) == log_without_speed(tmp_path / "reference")
    assert (out / TIMESTEP_LOG).read_text() == (tmp_path / "reference" / TIMESTEP_LOG).read_text()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    # DVCLive's metrics and plots: every logged step exactly once, with the uninterrupted run's values
    live, reference = out / LIVE_DIR, tmp_path / "reference" / LIVE_DIR
    for name in ("loss", "mse"):
        assert (live / "plots" / "metrics" / f"{name}.tsv").read_text() == \
            (reference / "plots" / "metrics" / f"{name}.tsv").read_text()
    speed = [line.split("\t")[0] for line in (live / "plots" / "metrics" / "images_per_s.tsv").read_text().splitlines()]
    assert speed == ["step", "7", "14", "21", "28", "35", "42", "49", "50"]
    assert (live / "plots" / "custom" / "timestep_loss.json").read_text() == \
        (reference / "plots" / "custom" / "timestep_loss.json").read_text()
    summary, expected = (json.loads((path / "metrics.json").read_text()) for path in (live, reference))
    assert summary.pop("images_per_s") > 0 and summary == {k: v for k, v in expected.items() if k != "images_per_s"}
    assert summary["step"] == 50


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_sigint_checkpoints_the_current_step_and_the_rerun_is_bitwise(tmp_path):
    """Ctrl-C: the step in progress finishes, a checkpoint holds it, one line names it and how to resume, exit
    code 130; the rerun ends with the weights and logs of a run never interrupted."""
    overrides = ["train.steps=50", "train.checkpoint_every=10", "train.log_every=7", "train.snapshot_steps=[]"]
    out = tmp_path / "interrupted"
    cmd = cli(tmp_path, out, overrides)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(out / CHECKPOINT, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    stopped_at = load_checkpoint(out / CHECKPOINT).step
    assert proc.returncode == 128 + signal.SIGINT and 10 <= stopped_at < 50
    assert stderr.splitlines() == [f"interrupted (SIGINT) at step {stopped_at} of 50: {out / CHECKPOINT} holds it; "
                                   "run the same command again to resume"]
    rerun = subprocess.run(cmd, timeout=120, capture_output=True, text=True)
    assert rerun.returncode == 0 and f"resuming at step {stopped_at} of 50" in rerun.stderr
    train(config_from_dict(TINY, overrides), tmp_path / "reference", progress=False)
    assert_same_weights(out, tmp_path / "reference")
    assert log_without_speed(out) == log_without_speed(tmp_path / "reference")
    assert (out / TIMESTEP_LOG).read_text() == (tmp_path / "reference" / TIMESTEP_LOG).read_text()


def worker_pids(agent: int) -> dict[int, int]:
    """{rank: pid} of the workers a torchrun agent started (Linux /proc)."""
    pids = {}
    for pid in (Path(f"/proc/{agent}/task/{agent}/children").read_text().split()):
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        pids[int(environ["RANK"])] = int(pid)
    return pids


@pytest.mark.slow
def test_torchrun_ranks_stop_at_the_same_step_whichever_the_signal_reaches(tmp_path):
    """SIGINT to rank 1 alone, then Ctrl-C as a terminal sends it (to every process, the agent forwarding it again):
    both ranks stop after the same step — rank 0 checkpoints it, nobody hangs — and the resumed run ends bitwise
    with the weights of two processes trained straight through."""
    overrides = ["train.steps=30", "train.checkpoint_every=4", "train.log_every=5", "train.snapshot_steps=[]",
                 "train.warmup_steps=0", "train.lr=0.0001", "model.dropout=0.0"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out, steps = tmp_path / "ddp", []
    for target in ("rank 1", "process group"):
        proc = subprocess.Popen(cli(tmp_path, out, overrides, launcher), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        start = load_checkpoint(out / CHECKPOINT).step if steps else 0
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINT).exists() or load_checkpoint(out / CHECKPOINT).step <= start:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        if target == "rank 1":
            os.kill(worker_pids(proc.pid)[1], signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        steps.append(load_checkpoint(out / CHECKPOINT).step)
        assert proc.returncode != 0 and steps[-1] < 30, stderr[-3000:]
        stopped = [line for line in stderr.splitlines() if line.startswith("interrupted")]
        assert stopped == [f"interrupted (SIGINT) at step {steps[-1]} of 30: {out / CHECKPOINT} holds it; run the "
                           "same command again to resume"], stderr[-3000:]
    resumed, straight = (subprocess.run(cli(tmp_path, folder, overrides, launcher), timeout=180, capture_output=True,
                                        text=True) for folder in (out, tmp_path / "straight"))
    assert resumed.returncode == 0 and f"resuming at step {steps[-1]} of 30" in resumed.stderr, resumed.stderr[-3000:]
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same_weights(out, tmp_path / "straight")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [[], ["weighting=learned", "train.ema=phema", "train.phema_every=2"]])
def test_two_gloo_processes_match_one(tmp_path, recipe):
    """The same weights and logs — with weighting: learned also the same uncertainty head (inside the
    DDP-wrapped module: its gradients are averaged with every other parameter's), with train.ema: phema the
    same profiles."""
    overrides = ["train.steps=4", "train.log_every=2", "train.warmup_steps=0", "train.lr=0.0001", "model.dropout=0.0",
                 *recipe]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(cli(tmp_path, tmp_path / "ddp", overrides, launcher), timeout=180, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    train(config_from_dict(TINY, overrides), tmp_path / "single", progress=False)
    ddp, single = load_checkpoint(tmp_path / "ddp" / CHECKPOINT), load_checkpoint(tmp_path / "single" / CHECKPOINT)
    assert ddp.step == single.step == 4
    for name, value in single.model.items():
        torch.testing.assert_close(ddp.model[name], value, atol=1e-5, rtol=0)
    for key, state in single.ema.items():
        for name, value in state.items():
            torch.testing.assert_close(ddp.ema[key][name], value, atol=1e-5, rtol=0)
    if recipe:
        assert list(ddp.ema) == ["phema-0.05", "phema-0.1"]
        assert (tmp_path / "ddp" / "phema" / "phema-0000004.pt").exists()
        for name, value in single.extra["uncertainty"].items():
            torch.testing.assert_close(ddp.extra["uncertainty"][name], value, atol=1e-6, rtol=0)
        assert single.extra["uncertainty"]["linear.weight"].abs().max() > 0
    for a, b in zip(log_without_speed(tmp_path / "ddp")[1:], log_without_speed(tmp_path / "single")[1:]):
        assert [float(x) for x in a] == pytest.approx([float(x) for x in b], rel=1e-4)


@pytest.mark.parametrize("density", [["train.timestep_sampler=loss_second_moment", "diffusion.steps=50",
                                      "train.steps=80", "train.checkpoint_every=10"],
                                     ["train.timestep_sampler=lognormal", "loss.importance_correction=true"]])
def test_timestep_densities_train_and_resume_bitwise(tmp_path, density):
    """loss_second_moment warms up (every one of 50 timesteps has its 10 losses within 80 × 16 draws) and keeps its
    history in the checkpoint: a stopped and resumed run is bitwise the uninterrupted one."""
    cfg = tiny("train.snapshot_steps=[12]", *density)
    full = train_stop_and_resume(cfg, tmp_path, stop_after=17)
    saved = load_checkpoint(tmp_path / "full" / CHECKPOINT).extra["timesteps"]
    if cfg.train.timestep_sampler == "loss_second_moment":
        assert bool((saved["counts"] == 10).all())  # warmed up: the importance sampling was used
    others = [o for o in density if not o.startswith(("train.timestep_sampler", "loss.importance"))]
    uniform = train(tiny("train.snapshot_steps=[12]", *others), tmp_path / "uniform", progress=False)
    assert uniform.loss != full.loss


# ----------------------------------------------------------------------------- weighting: learned

@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_learned_weighting_trains_resumes_bitwise_and_keeps_its_head(tmp_path, target):
    cfg = tiny("weighting=learned", "loss.learned_base=debias", f"target={target}", "train.snapshot_steps=[12]")
    assert cfg.model.learn_sigma
    train_stop_and_resume(cfg, tmp_path, stop_after=7)
    heads = [load_checkpoint(tmp_path / run / CHECKPOINT).extra["uncertainty"] for run in ("full", "split")]
    assert heads[0].keys() == {"freqs", "phases", "linear.weight", "linear.bias"}
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    assert heads[0]["linear.weight"].abs().max() > 0  # it learned
    export_model(tmp_path / "full", tmp_path / "model.pt")
    exported = load_checkpoint(tmp_path / "model.pt").extra["uncertainty"]
    assert all(torch.equal(exported[k], heads[0][k]) for k in heads[0])
    plot = json.loads((tmp_path / "full" / LIVE_DIR / "plots" / "custom" / "weighting.json").read_text())
    assert len(plot) == cfg.diffusion.steps and plot[0].keys() == {"t", "weight", "u"}
    assert any(point["u"] != 0 for point in plot)
    assert plot == json.loads((tmp_path / "split" / LIVE_DIR / "plots" / "custom" / "weighting.json").read_text())


def test_a_fixed_weighting_plots_its_weight_with_u_zero(tmp_path):
    cfg = tiny("train.steps=3", "train.snapshot_steps=[]")
    train(cfg, tmp_path, progress=False)
    plot = json.loads((tmp_path / LIVE_DIR / "plots" / "custom" / "weighting.json").read_text())
    weights = weight_table(cfg.weighting, Schedule.named("linear", 1000).snr, cfg.target, cfg.loss)
    assert [p["u"] for p in plot] == [0.0] * 1000
    assert [p["weight"] for p in plot] == pytest.approx(weights.tolist(), rel=1e-12)
    assert "uncertainty" not in load_checkpoint(tmp_path / CHECKPOINT).extra


def test_without_dvclive_the_tsv_logs_are_the_same_and_one_note_says_so(tmp_path, monkeypatch, caplog):
    cfg = tiny("train.steps=6", "train.snapshot_steps=[]")
    train(cfg, tmp_path / "with", progress=False)
    monkeypatch.setitem(sys.modules, "dvclive", None)  # `from dvclive import Live` raises ImportError
    with caplog.at_level(logging.INFO):
        train(cfg, tmp_path / "without", progress=False, stop_after=3)
        train(cfg, tmp_path / "without", progress=False)  # resumed: the logs are rewritten without DVCLive too
    assert not (tmp_path / "without" / LIVE_DIR).exists() and (tmp_path / "with" / LIVE_DIR).is_dir()
    assert log_without_speed(tmp_path / "without") == log_without_speed(tmp_path / "with")
    assert (tmp_path / "without" / TIMESTEP_LOG).read_text() == (tmp_path / "with" / TIMESTEP_LOG).read_text()
    assert_same_weights(tmp_path / "with", tmp_path / "without")
    notes = [r.getMessage() for r in caplog.records if "dvclive is not installed" in r.getMessage()]
    assert len(notes) == 2 and all(n.startswith("note: ") for n in notes)  # one per run of train()
