"""Reliability and security (docs/guarantees.md): the guarantees as tested facts.

- Kill anywhere: SIGKILL of `debias sample` (.npz and .png), `debias fid` and the report writer at
  random (seeded) moments leaves the declared output absent or a complete earlier version, and a
  rerun gives the uninterrupted run's output. Training is covered by
  tests/test_training.py::test_sigkill_and_rerun_is_bitwise.
- Hostile checkpoints (truncated, random bytes, foreign format, other architecture, malicious
  pickle) are refused in one line, and a pickle payload never runs.
- Hostile image folders (empty, fake, bomb, 16-bit, CMYK, extreme aspect, FIFO, symlink loops) are
  skipped with a reason or fail in one line, never hang.
- Numerical faults: inf gradients under a GradScaler skip the step and halve the scale (the NaN
  stop is tests/test_training.py::test_non_finite_loss_stops_and_keeps_last_good_checkpoint).
- Concurrency: concurrent writers of one path never produce a torn file; two trainings of one
  folder are refused by its lock.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shlex
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import debias.diffusion.objective as objective
from debias.checkpoints import FORMAT, FORMAT_VERSION, Checkpoint, load_checkpoint, save_checkpoint
from debias.cli import app
from debias.config import config_from_dict
from debias.data.datasets import load_dataset
from debias.errors import DebiasError
from debias.images import load_images, read_npz, save_npz, save_png_grid
from debias.metrics.features import load_features, save_features
from debias.metrics.inception import resolve_inception_weights
from debias.models.factory import model_from_checkpoint, unet_kwargs_for
from debias.models.unet import UNetModel
from debias.runtime import Ranks, autocast_dtype
from debias.train.loop import Trainer, run_logs, train as train_on
from debias.train.rundir import CHECKPOINT, RunDir


def train(cfg, out_dir, **kwargs):
    """The training loop on the config's own dataset."""
    return train_on(cfg, out_dir, load_dataset(cfg.data), **kwargs)

# a micro recipe: 32 digits, a one-level UNet without attention, T = 50, four steps of training
MICRO = ["data.max_images=32", "model.channel_mult=[1]", "model.attention_resolutions=[]", "diffusion.steps=50",
         "train.steps=4", "train.batch_size=8", "train.warmup_steps=0", "train.log_every=2",
         "train.checkpoint_every=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("micro")
    train(config_from_dict({}, MICRO), out, progress=False)
    return out / CHECKPOINT


def assert_one_line_error(result, *words: str) -> str:
    """A CliRunner result that failed cleanly: exit 2, exactly one line "error: ..." on stderr."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ================================================================================== kill anywhere


def run_and_kill(cmd: list[str], delay: float) -> int:
    """Start ``cmd``, SIGKILL it after ``delay`` seconds unless it finished; its return code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


def timed_run(cmd: list[str], timeout: float = 120) -> float:
    began = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return time.monotonic() - began


def assert_only_outputs_or_hidden_temps(folder: Path, *names: str) -> None:
    """Nothing but the declared outputs is visible in ``folder``; a killed writer can only leave a
    hidden ``.NAME.*.tmp`` sibling (its temporary file) or, for `debias sample`, the hidden
    ``.NAME.chunks`` folder it resumes from, never a torn file under a declared name."""
    for entry in folder.iterdir():
        assert entry.name in names or any(entry.name.startswith(f".{name}.") and entry.name.endswith(".tmp")
                                          or entry.name == f".{name}.chunks" and entry.is_dir()
                                          for name in names), entry


def assert_only_output_or_hidden_temps(path: Path) -> None:
    assert_only_outputs_or_hidden_temps(path.parent, path.name)


def kill_at_random_moments(cmd: list[str], out: Path, seeds: range, span: float, previous: bytes,
                           complete: bytes | None) -> list[float]:
    """SIGKILL ``cmd`` after a seeded random delay in [0, span) for each seed. For odd seeds ``out``
    first holds a complete earlier version (``previous``); after each kill ``out`` must be absent
    (even seeds), that earlier version, or a complete output (``complete`` if given)."""
    for seed in seeds:
        delay = random.Random(seed).uniform(0, span)
        out.unlink(missing_ok=True)
        if seed % 2:
            out.write_bytes(previous)
        run_and_kill(cmd, delay)
        if out.exists():
            data = out.read_bytes()
            allowed = [previous] if seed % 2 else []
            if data not in allowed:
                assert complete is None or data == complete, f"seed {seed}: torn output after {delay:.2f} s"
        assert_only_output_or_hidden_temps(out)


def sample_cmd(checkpoint: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "debias", "sample", str(checkpoint), "--solver", "dpmsolver++", "--steps", "10",
            "-n", "64", "--seed", "3", "--out", str(out)]


@pytest.fixture(scope="module")
def sample_reference(micro_checkpoint, tmp_path_factory) -> tuple[np.ndarray, bytes, float]:
    """An uninterrupted `debias sample` run: its images, its .npz bytes and how long it took."""
    path = tmp_path_factory.mktemp("reference") / "samples.npz"
    span = timed_run(sample_cmd(micro_checkpoint, path))
    return read_npz(path).numpy(), path.read_bytes(), span


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["npz", "png"])
def test_sigkill_sample_leaves_nothing_torn_and_rerun_matches(micro_checkpoint, sample_reference, tmp_path, suffix):
    images, reference_npz, span = sample_reference
    save = save_npz if suffix == "npz" else save_png_grid
    save(images, tmp_path / f"complete.{suffix}")       # what an uninterrupted run writes
    save(255 - images, tmp_path / f"previous.{suffix}")  # a complete earlier output
    complete, previous = (tmp_path / f"complete.{suffix}").read_bytes(), (tmp_path / f"previous.{suffix}").read_bytes()
    assert suffix == "png" or complete == reference_npz
    out = tmp_path / "out" / f"samples.{suffix}"
    out.parent.mkdir()
    cmd = sample_cmd(micro_checkpoint, out)
    kill_at_random_moments(cmd, out, range(2) if suffix == "npz" else range(2, 4), span, previous, complete)
    timed_run(cmd)
    assert out.read_bytes() == complete
    assert_only_output_or_hidden_temps(out)


def low_rank_fid(x1: np.ndarray, x2: np.ndarray) -> float:
    """FID of two small feature sets computed independently of :mod:`debias.metrics`: with
    Σ1 = AᵀA and Σ2 = BᵀB (centred rows over √(n − 1)), tr (Σ1^½ Σ2 Σ1^½)^½ is the sum of the
    singular values of A Bᵀ (n1 × n2)."""
    a = (x1 - x1.mean(0)) / np.sqrt(len(x1) - 1)
    b = (x2 - x2.mean(0)) / np.sqrt(len(x2) - 1)
    return float(((x1.mean(0) - x2.mean(0)) ** 2).sum() + (a * a).sum() + (b * b).sum()
                 - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum())


@pytest.mark.slow
def test_sigkill_fid_leaves_nothing_torn_and_rerun_matches(tmp_path):
    """`debias fid` on precomputed 2048-d features (as the evaluate stage scores against the prepared
    reference features): a kill leaves the earlier result; the rerun's FID is the right value."""
    sha256 = resolve_inception_weights().sha256
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((4, 2048)), rng.standard_normal((4, 2048)) + 0.3
    gen, ref = tmp_path / "gen.npz", tmp_path / "ref.npz"
    save_features(gen, torch.from_numpy(x1), {"weights_sha256": sha256})
    save_features(ref, torch.from_numpy(x2), {"weights_sha256": sha256})
    out = tmp_path / "metrics" / "fid.json"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "debias", "fid", str(gen), str(ref), "--metric", "fid", "--out", str(out)]
    previous = json.dumps({"fid": 1.0, "provenance": {}}).encode()

    def assert_complete(result: dict) -> None:
        assert result["fid"] == pytest.approx(low_rank_fid(x1, x2), rel=1e-6)
        assert result["provenance"]["weights_sha256"] == sha256
        assert (result["provenance"]["n_generated"], result["provenance"]["n_reference"]) == (4, 4)

    # one kill at a seeded moment of the run (imports, weights, the 2048 x 2048 matrix square root)
    kill_at_random_moments(cmd, out, range(1, 2), 5.0, previous, None)
    if out.read_bytes() != previous:  # the run had finished before the kill: its result is whole
        assert_complete(json.loads(out.read_text()))
    timed_run(cmd)
    assert_complete(json.loads(out.read_text()))
    assert_only_output_or_hidden_temps(out)


def test_foreign_feature_files_are_one_line_errors(tmp_path):
    sha256 = resolve_inception_weights().sha256
    good = tmp_path / "good.npz"
    save_features(good, torch.zeros(4, 2048), {"weights_sha256": sha256})
    cases = {"narrow.npz": (torch.zeros(4, 64), {"weights_sha256": sha256}, "64-d"),
             "other_weights.npz": (torch.zeros(4, 2048), {"weights_sha256": "0" * 64}, "recompute")}
    for name, (values, meta, words) in cases.items():
        save_features(tmp_path / name, values, meta)
        result = CliRunner().invoke(app, ["fid", str(good), str(tmp_path / name), "-m", "fid"])
        assert_one_line_error(result, words)
    np.savez(tmp_path / "list_meta.npz", features=np.zeros((4, 2048)), meta=np.array(json.dumps([1, 2])))
    with pytest.raises(DebiasError, match="not a features file"):
        load_features(tmp_path / "list_meta.npz")


REPORT_RUNNER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from debias.io import write_tsv
    from debias.report import render_report

    def write(out):
        rows = [{"solver": s, "steps": k, "fid": 1.0 / k, "note": "x" * 200} for s in ("ddim", "unipc")
                for k in range(1, 2000)]
        write_tsv(out / "table.tsv", rows)
        steps = {"ddim": [{"steps": k, "fid": 1.0 / k, "kid": 0.1, "precision": 0.5, "recall": 0.5, "seconds": 1.0}
                          for k in range(1, 2000)]}
        render_report(out / "report.md", recipe={"weighting": "debias", "target": "eps"}, steps_by_solver=steps,
                      provenance=None, training={"steps": 4}, figures=[], grids={})

    if __name__ == "__main__":
        write(Path(sys.argv[1]))
""")


@pytest.mark.slow
def test_sigkill_report_writer_leaves_nothing_torn_and_rerun_matches(tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    runner: dict = {"__name__": "reference"}
    exec(REPORT_RUNNER, runner)
    runner["write"](reference)  # the uninterrupted output (plain text: the same in any process)
    names = ("table.tsv", "report.md")
    complete = {name: (reference / name).read_bytes() for name in names}
    cmd = [sys.executable, "-c", REPORT_RUNNER, str(out)]
    earlier = b"an earlier complete version\n"
    for seed in (10, 11):
        out.mkdir(exist_ok=True)
        for name in names:
            (out / name).unlink(missing_ok=True)
            if seed % 2:
                (out / name).write_bytes(earlier)
        run_and_kill(cmd, random.Random(seed).uniform(0, 4.0))  # the run takes ~2-4 s (imports, then writes)
        assert_only_outputs_or_hidden_temps(out, *names)
        for name in names:
            if (out / name).exists():
                assert (out / name).read_bytes() in (complete[name], earlier), (seed, name)
    timed_run(cmd)
    for name in names:
        assert (out / name).read_bytes() == complete[name]
    assert_only_outputs_or_hidden_temps(out, *names)


# every kind of output the pipeline writes, written again and again by a process killed at a random moment
WRITER_LOOP = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import numpy as np
    import torch
    from debias.checkpoints import Checkpoint, save_checkpoint
    from debias.images import save_npz, save_png_grid
    from debias.io import write_json, write_tsv
    from debias.metrics.features import save_features
    from debias.report import render_report

    def images(v):
        return np.full((16 * (v + 1), 3, 8, 8), 40 * (v + 1), dtype=np.uint8)

    WRITERS = {
        "samples.npz": lambda v, p: save_npz(images(v), p),
        "grid.png": lambda v, p: save_png_grid(images(v), p),
        "metrics.json": lambda v, p: write_json(p, {"fid": float(v), "rows": list(range(3000 * (v + 1)))}),
        "table.tsv": lambda v, p: write_tsv(p, [{"step": k, "loss": v + k / 7} for k in range(2000 * (v + 1))]),
        "report.md": lambda v, p: render_report(p, recipe={"v": v}, steps_by_solver={}, provenance=None,
                                               training={"rows": "y" * 50000 * (v + 1)}, figures=[], grids={}),
        "features.npz": lambda v, p: save_features(p, torch.full((40 * (v + 1), 2048), float(v)),
                                                   {"weights_sha256": str(v)}),
        "checkpoint.pt": lambda v, p: save_checkpoint(p, Checkpoint(config={"v": v}, unet_kwargs={},
                                                                   model={"w": torch.full((20000 * (v + 1),), float(v))}, step=v)),
    }
    out, freeze_at = Path(sys.argv[1]), int(sys.argv[2])
    for v in (0, 1):
        for name, write in WRITERS.items():
            write(v, out / f"version{v}" / name)
    live = out / "live"
    live.mkdir()
    fsyncs, real_fsync = [], os.fsync

    def fsync(fd):  # write number `freeze_at` stops with its temporary file written but not yet renamed
        fsyncs.append(fd)
        if len(fsyncs) == freeze_at:
            print("frozen", flush=True)
            time.sleep(600)
        real_fsync(fd)

    os.fsync = fsync
    print("ready", flush=True)
    i = 0
    while True:
        for name, write in WRITERS.items():
            write(i % 2, live / name)
        i += 1
""")


@pytest.mark.slow
def test_sigkill_during_writes_leaves_a_complete_file(tmp_path):
    """A process that does nothing but rewrite every kind of output, killed at a random moment (run 0)
    and while a randomly chosen write has its temporary file complete but not yet renamed (run 1):
    every declared output is a whole version."""
    names = ("samples.npz", "grid.png", "metrics.json", "table.tsv", "report.md", "features.npz")
    for seed in range(2):
        out = tmp_path / f"run{seed}"
        freeze_at = random.Random(seed).randint(1, 2 * (len(names) + 1)) if seed else 0
        proc = subprocess.Popen([sys.executable, "-c", WRITER_LOOP, str(out), str(freeze_at)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            if freeze_at:
                assert proc.stdout.readline().strip() == "frozen"
            else:
                time.sleep(random.Random(seed).uniform(0.05, 0.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if freeze_at:
            assert [p for p in (out / "live").iterdir() if p.name.endswith(".tmp")], "no write was interrupted"
        versions = [{name: (out / f"version{v}" / name).read_bytes() for name in names} for v in (0, 1)]
        for name in names:
            path = out / "live" / name
            if path.exists():
                assert path.read_bytes() in (versions[0][name], versions[1][name]), (seed, name)
        assert_only_outputs_or_hidden_temps(out / "live", *names, "checkpoint.pt")
        path = out / "live" / "checkpoint.pt"
        if path.exists():
            ckpt = load_checkpoint(path)  # torch.save bytes vary; the content must be one whole version
            assert ckpt.config == {"v": ckpt.step} and torch.equal(
                ckpt.model["w"], torch.full((20000 * (ckpt.step + 1),), float(ckpt.step)))


# ================================================================================== checkpoint safety


class Payload:
    """Pickles to a call of ``func(*args)``: what a malicious checkpoint would run on loading."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def malicious_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """Files that would create ``marker`` if they were unpickled."""
    shell = Payload(os.system, f"touch {shlex.quote(str(marker))}")
    python = Payload(exec, f"open({str(marker)!r}, 'w').close()")
    looks_valid = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": {}, "unet_kwargs": {},
                   "model": {"w": torch.zeros(2)}, "extra": {"x": python}}
    files = {"zip_os_system": lambda f: torch.save({"model": shell}, f),
             "zip_exec_inside_valid_checkpoint": lambda f: torch.save(looks_valid, f),
             "legacy_torch_format": lambda f: torch.save({"model": shell}, f, _use_new_zipfile_serialization=False),
             "raw_pickle": lambda f: pickle.dump({"model": shell}, f, protocol=2),
             "state_dict_with_payload": lambda f: torch.save({"conv.weight": torch.zeros(1), "x": python}, f)}
    paths = {}
    for name, write in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        with open(paths[name], "wb") as f:
            write(f)
    return paths


def test_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    files = malicious_files(tmp_path, marker)
    for name, path in files.items():
        with pytest.raises(DebiasError, match="not a safe checkpoint") as err:
            load_checkpoint(path)
        assert "\n" not in str(err.value), name
        result = CliRunner().invoke(app, ["sample", str(path), "-n", "2", "--steps", "2", "--out",
                                          str(tmp_path / "x.npz")])
        assert_one_line_error(result, "not a safe checkpoint")
        result = CliRunner().invoke(app, ["convert", str(path), "--flags", "--image_size 8", "--out",
                                          str(tmp_path / "y.pt")])
        assert_one_line_error(result, "refusing to unpickle")
        assert not marker.exists(), f"{name} ran its payload"
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "y.pt").exists()


def test_malicious_npz_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "samples.npz"
    np.savez(path, images=np.array([Payload(os.system, f"touch {shlex.quote(str(marker))}")], dtype=object))
    with pytest.raises(DebiasError):
        read_npz(path)
    with pytest.raises(DebiasError):
        load_images(path)
    assert not marker.exists()


def test_unreadable_checkpoints_are_one_line_errors(micro_checkpoint, tmp_path):
    data = micro_checkpoint.read_bytes()
    cases = {"truncated": (data[:len(data) // 2], "truncated or corrupt"),
             "cut_at_the_end": (data[:-100], "truncated or corrupt"),
             "random_bytes": (random.Random(0).randbytes(4096), "checkpoint"),
             "random_zip_magic": (b"PK\x03\x04" + random.Random(1).randbytes(4096), "checkpoint"),
             "empty": (b"", "checkpoint")}
    for name, (content, words) in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        with pytest.raises(DebiasError, match=words) as err:
            load_checkpoint(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value), name
        result = CliRunner().invoke(app, ["sample", str(path), "-n", "2", "--out", str(tmp_path / "x.npz")])
        assert_one_line_error(result, str(path))
        result = CliRunner().invoke(app, ["convert", str(path), "--flags", "--image_size 8", "--out",
                                          str(tmp_path / "y.pt")])
        assert_one_line_error(result, str(path))
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "y.pt").exists()


def test_foreign_format_suggests_debias_convert(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(UNetModel(image_size=8, in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1,
                         attention_resolutions=[], channel_mult=(1,)).state_dict(), path)
    with pytest.raises(DebiasError, match="not a debias checkpoint.*debias convert"):
        load_checkpoint(path)
    for blob in ([1, 2, 3], {"format": "something-else"}, torch.zeros(3)):
        torch.save(blob, path)
        with pytest.raises(DebiasError, match="debias convert"):
            load_checkpoint(path)
    result = CliRunner().invoke(app, ["sample", str(path), "-n", "2", "--out", str(tmp_path / "x.npz")])
    assert_one_line_error(result, "debias convert")


def test_checkpoint_of_another_architecture_is_refused(micro_checkpoint, tmp_path):
    ckpt = load_checkpoint(micro_checkpoint)
    other = {"wider": {"model_channels": 64}, "deeper": {"channel_mult": (1, 2)},
             "more_blocks": {"num_res_blocks": 2}, "rgb": {"in_channels": 3, "out_channels": 6},
             "attention": {"attention_resolutions": [1]}}
    for name, change in other.items():
        foreign = Checkpoint(**{**vars(ckpt), "unet_kwargs": {**ckpt.unet_kwargs, **change}})
        with pytest.raises(DebiasError, match="does not fit the model") as err:
            model_from_checkpoint(foreign, source=name)
        assert "\n" not in str(err.value)
        path = tmp_path / f"{name}.pt"
        save_checkpoint(path, foreign)
        result = CliRunner().invoke(app, ["sample", str(path), "-n", "2", "--steps", "2", "--out",
                                          str(tmp_path / "x.npz")])
        assert_one_line_error(result, "does not fit the model", name)
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("unet_kwargs", [{"bogus": 1}, {"image_size": "eight"}, [1, 2], None])
def test_checkpoint_with_unusable_model_arguments_is_refused(micro_checkpoint, tmp_path, unet_kwargs):
    ckpt = load_checkpoint(micro_checkpoint)
    blob = {**ckpt.to_dict(), "unet_kwargs": unet_kwargs}
    path = tmp_path / "odd.pt"
    torch.save(blob, path)
    result = CliRunner().invoke(app, ["sample", str(path), "-n", "2", "--steps", "2", "--out", str(tmp_path / "x.npz")])
    assert_one_line_error(result, str(path))


@pytest.mark.parametrize("drop", ["model", "config", "unet_kwargs"])
def test_checkpoint_missing_a_part_is_refused(micro_checkpoint, tmp_path, drop):
    blob = load_checkpoint(micro_checkpoint).to_dict()
    del blob[drop]
    path = tmp_path / "partial.pt"
    torch.save(blob, path)
    with pytest.raises(DebiasError, match=drop):
        load_checkpoint(path)


def test_damaged_checkpoints_fail_only_with_debias_error(micro_checkpoint, tmp_path):
    """Random truncations, byte flips and garbage: a checkpoint either loads and builds its model, or
    fails with one DebiasError line — never another exception, never a warning on stderr."""
    data = micro_checkpoint.read_bytes()
    rng = random.Random(0)
    path = tmp_path / "damaged.pt"
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(150):
        kind = i % 3
        if kind == 0:
            damaged = data[:rng.randrange(len(data))]
        elif kind == 1:
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 20)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            damaged = bytes(damaged)
        else:
            damaged = rng.choice([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x05"]) + rng.randbytes(rng.randint(0, 2000))
        path.write_bytes(damaged)
        try:
            model_from_checkpoint(load_checkpoint(path), source=str(path))
            outcomes["loaded"] += 1
        except DebiasError as err:
            assert "\n" not in str(err) and str(path) in str(err)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100


# ================================================================================== hostile data


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, so that its header can claim anything."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


GOOD = ["good.png", "aspect_tall.png", "aspect_wide.png", "aspect_extreme.png", "grey16.png", "rgb48.png",
        "cmyk.jpg", "sub/inner.png", "palette_alpha.png"]
# bad file → words its skip reason must contain
BAD = {"zero.png": "empty file", "text.jpg": "cannot identify", "html.png": "cannot identify",
       "bomb_header.png": "decompression bomb", "bomb_pixels.png": "decompression bomb",
       "bomb_limit.png": "decompression bomb", "truncated.png": "truncated", "fifo.png": "not a regular file",
       "self_loop.png": "cannot stat", "dangling.png": "cannot stat", "line\nbreak.png": "cannot identify"}


def hostile_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 12), (200, 30, 30)).save(root / "good.png")
    Image.new("RGB", (1, 500), (0, 0, 255)).save(root / "aspect_tall.png")
    Image.new("RGB", (500, 1), (0, 255, 0)).save(root / "aspect_wide.png")
    Image.new("L", (1, 30000), 77).save(root / "aspect_extreme.png")
    Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16)).save(root / "grey16.png")
    (root / "rgb48.png").write_bytes(png_bytes(9, 9, 16, 2, (b"\0" + b"\xff\xff\x00\x00\x00\x00" * 9) * 9))
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "sub" / "inner.png")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(root / "palette_alpha.png", transparency=0)
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a JPEG\n" * 10)
    (root / "html.png").write_text("<html><body>404</body></html>")
    (root / "line\nbreak.png").write_text("a file name with a line break")
    # a 100000 x 100000 header with a tiny IDAT: rejected before any pixel is decoded
    (root / "bomb_header.png").write_bytes(png_bytes(100_000, 100_000, 8, 0, b"\0" * 100))
    # 1 bit per pixel, 15000 x 15000 = 225 Mpx (> 2 x PIL's limit) in a ~30 kB file
    (root / "bomb_pixels.png").write_bytes(png_bytes(15_000, 15_000, 1, 0, (b"\0" * 1876) * 15_000))
    # 10000 x 10000 = 100 Mpx: over PIL's limit but under twice it (PIL only warns)
    (root / "bomb_limit.png").write_bytes(png_bytes(10_000, 10_000, 1, 0, (b"\0" * 1251) * 10_000))
    whole = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[:len(whole) // 2 + 10])
    os.mkfifo(root / "fifo.png")
    os.symlink("self_loop.png", root / "self_loop.png")
    os.symlink("missing.png", root / "dangling.png")
    os.symlink("..", root / "sub" / "parent")  # a directory loop: sub/parent/sub/parent/...
    os.symlink(".", root / "sub" / "itself")


HOSTILE_RUNNER = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    from debias.config import DataConfig
    from debias.data.datasets import load_dataset
    from debias.errors import DebiasError

    root, bad = Path(sys.argv[1]), json.loads(sys.argv[2])
    data = load_dataset(DataConfig(name="folder", path=str(root), image_size=8, channels=3))
    result = {"kept": len(data), "skipped": dict(data.skipped), "shape": list(data.images.shape),
              "finite": bool(data.images.isfinite().all()), "fail": {}}
    grey = load_dataset(DataConfig(name="folder", path=str(root), image_size=8, channels=1))
    result["grey_kept"] = len(grey)
    for name in bad:  # on_error=fail: each bad file next to one good image
        folder = root.parent / ("fail_" + name.replace("/", "_"))
        folder.mkdir()
        shutil.copy(root / "good.png", folder / "good.png")
        source = root / name
        target = folder / name
        if source.is_symlink():
            target.symlink_to(source.readlink())
        elif not source.is_file():
            import os
            os.mkfifo(target)
        else:
            shutil.copy(source, target)
        try:
            load_dataset(DataConfig(name="folder", path=str(folder), image_size=8, channels=3, on_error="fail"))
            result["fail"][name] = None
        except DebiasError as err:
            result["fail"][name] = str(err)
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_hostile_image_folder_is_reported_never_hangs(tmp_path):
    root = tmp_path / "images"
    hostile_folder(root)
    done = subprocess.run([sys.executable, "-c", HOSTILE_RUNNER, str(root), json.dumps(list(BAD))],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["kept"] == len(GOOD) and result["grey_kept"] == len(GOOD)
    assert result["shape"] == [len(GOOD), 3, 8, 8] and result["finite"]
    assert sorted(result["skipped"]) == sorted(BAD)
    for name, words in BAD.items():
        assert words in result["skipped"][name], (name, result["skipped"][name])
        message = result["fail"][name]
        assert message is not None and "\n" not in message, name
        assert message.startswith("cannot read image ") and name.replace("\n", "\\n") in message, message
        assert words in message, message
    warnings = [line for line in done.stderr.splitlines() if "skipped" in line]  # one line per load (RGB, grey)
    assert len(warnings) == 2 and all(f"skipped {len(BAD)} of {len(BAD) + len(GOOD)} images" in w for w in warnings)


def test_hostile_pixel_values_are_converted_correctly(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16)).save(root / "a_grey16.png")
    (root / "b_rgb48.png").write_bytes(png_bytes(9, 9, 16, 2, (b"\0" + b"\xff\xff\x00\x00\x00\x00" * 9) * 9))
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "c_cmyk.jpg", quality=100)
    Image.new("RGB", (1, 500), (0, 0, 255)).save(root / "d_tall.png")
    data = load_dataset(config_from_dict({}, ["data.name=folder", f"data.path={root}", "data.channels=3"]).data)
    images = ((data.images + 1) * 127.5).round()
    assert images[0].eq(255).all()                                            # 16-bit white is white
    assert images[1, 0].eq(255).all() and images[1, 1:].eq(0).all()           # 48-bit red is red
    assert images[2, 0].gt(240).all() and images[2, 1:].lt(15).all()         # CMYK red is red
    assert images[3, :2].eq(0).all() and images[3, 2].eq(255).all()           # 1x500 blue is blue


# ================================================================================== numerical faults


def test_fp16_needs_cuda_and_falls_back_to_bf16_on_cpu(caplog, tmp_path):
    """train.precision=fp16 autocasts to float16 and uses a GradScaler on CUDA only; on a CPU it
    runs bf16 without a scaler (no overflow is possible there), and says so."""
    assert autocast_dtype("fp16", torch.device("cpu"), fallback=True) == torch.bfloat16
    assert "fp16 needs CUDA" in caplog.text
    assert autocast_dtype("fp16", torch.device("cuda"), fallback=True) == torch.float16
    cfg = config_from_dict({}, [*MICRO, "train.precision=fp16"])
    dataset = load_dataset(cfg.data)
    trainer = Trainer(cfg, dataset, unet_kwargs_for(cfg, dataset.num_classes), torch.device("cpu"), Ranks(),
                      run_logs(cfg, tmp_path, torch.device("cpu"), Ranks()))
    assert (trainer.autocast_dtype, trainer.scaler) == (torch.bfloat16, None)


def overflowing_at(call: int):
    """The objective's diffusion_loss, except that call number ``call`` (0-based) returns a finite mean loss of
    1e37, so that loss * scale = inf and every gradient overflows."""
    real, calls = objective.diffusion_loss, []

    def loss(*args, **kwargs):
        terms = real(*args, **kwargs)
        if len(calls) == call:
            terms.loss = terms.loss * (1e37 / terms.loss.detach().mean())
        calls.append(1)
        return terms

    return loss


def test_overflowing_gradients_skip_the_step_and_halve_the_scale(monkeypatch, tmp_path):
    """The GradScaler path of Trainer.step (what train.precision=fp16 runs on CUDA), on the CPU: a
    step whose scaled gradients overflow leaves the weights untouched and halves the loss scale;
    training then goes on with finite weights and no non-finite-loss stop."""
    cfg = config_from_dict({}, MICRO)
    dataset = load_dataset(cfg.data)
    unet_kwargs = unet_kwargs_for(cfg, dataset.num_classes)
    trainer = Trainer(cfg, dataset, unet_kwargs, torch.device("cpu"), Ranks(), run_logs(cfg, tmp_path, torch.device("cpu"), Ranks()))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    monkeypatch.setattr(objective, "diffusion_loss", overflowing_at(1))
    weights = []
    for k in range(4):
        trainer.step(k)
        weights.append([p.detach().clone() for p in trainer.network.parameters()])
    assert trainer.scaler.get_scale() == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1])), "the overflowing step was applied"
    assert not all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))
    assert all(p.isfinite().all() for p in weights[-1])
    assert all(s.isfinite().all() for shadows in trainer.ema.shadows.values() for s in shadows)
    assert trainer.first_bad_step() is None
    state = trainer.checkpoint(4, trainer.logs.state()).scaler
    assert state is not None and state["scale"] == 2.0**15  # the scale is checkpointed for resuming


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs CUDA")
def test_fp16_training_on_cuda_recovers_from_overflow(monkeypatch, tmp_path):
    monkeypatch.setattr(objective, "diffusion_loss", overflowing_at(2))
    cfg = config_from_dict({}, [*MICRO, "train.precision=fp16", "train.devices=cuda", "train.steps=6"])
    train(cfg, tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)
    assert ckpt.step == 6 and ckpt.scaler["scale"] == 2.0**15
    assert all(v.isfinite().all() for v in ckpt.model.values())


# ================================================================================== concurrency


CONCURRENT_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    import torch
    from debias.checkpoints import Checkpoint, save_checkpoint
    from debias.io import atomic_write
    from debias.images import save_npz

    out, writer, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    (out / f"ready{writer}").touch()
    while not (out / "go").exists():  # both writers start together
        time.sleep(0.001)
    for i in range(rounds):
        v = writer * 1000 + i
        size = 1000 + 997 * (v % 50)
        atomic_write(out / "blob.bin", lambda f: f.write(f"{v} {size}\\n".encode() + bytes([v % 251]) * size))
        save_npz(np.full((1 + v % 7, 1, 8, 8), v % 251, dtype=np.uint8), out / "samples.npz")
        save_checkpoint(out / "checkpoint.pt", Checkpoint(config={"v": v}, unet_kwargs={},
                                                        model={"w": torch.full((100 + v % 300,), float(v))}, step=v))
""")


def check_blob(data: bytes) -> int:
    head, body = data.split(b"\n", 1)
    v, size = map(int, head.split())
    assert body == bytes([v % 251]) * size
    return v


def check_samples(path: Path) -> int:
    with np.load(path) as data:
        images = data["images"]
    value = int(images.flat[0])
    assert images.shape[1:] == (1, 8, 8) and (images == value).all()
    return value


def check_checkpoint(path: Path) -> int:
    ckpt = load_checkpoint(path)
    assert ckpt.config == {"v": ckpt.step}
    assert torch.equal(ckpt.model["w"], torch.full((100 + ckpt.step % 300,), float(ckpt.step)))
    return ckpt.step


@pytest.mark.slow
def test_concurrent_writers_never_interleave(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(tmp_path), str(w), "80"],
                              stderr=subprocess.PIPE, env=ENV) for w in (1, 2)]
    seen: dict[str, set[int]] = {"blob": set(), "samples": set(), "checkpoint": set()}
    reads = 0
    deadline = time.monotonic() + 120
    while not ((tmp_path / "ready1").exists() and (tmp_path / "ready2").exists()):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "writers did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "writers hung"
        if (tmp_path / "blob.bin").exists():
            seen["blob"].add(check_blob((tmp_path / "blob.bin").read_bytes()) // 1000)
        if (tmp_path / "samples.npz").exists():
            seen["samples"].add(check_samples(tmp_path / "samples.npz"))
        if (tmp_path / "checkpoint.pt").exists():
            seen["checkpoint"].add(check_checkpoint(tmp_path / "checkpoint.pt") // 1000)
        reads += 1
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()
    check_blob((tmp_path / "blob.bin").read_bytes())
    check_samples(tmp_path / "samples.npz")
    check_checkpoint(tmp_path / "checkpoint.pt")
    assert reads > 20 and seen["blob"] == {1, 2} and seen["checkpoint"] == {1, 2}
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_second_debias_train_on_one_folder_is_refused(tmp_path):
    """A `debias train` process is running; a second `debias train` of the same folder fails at once
    with one line and writes nothing; the lock dies with the first process (even by SIGKILL)."""
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    out = tmp_path / "run"
    sets = [a for o in [*MICRO, "train.steps=100000", "train.checkpoint_every=100000"] for a in ("-S", o)]
    args = ["train", "-p", str(params), "--out", str(out), "--no-progress", *sets]
    first = subprocess.Popen([sys.executable, "-m", "debias", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not (out / "train_log.tsv").exists():  # written once the first run holds the lock
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert_one_line_error(CliRunner().invoke(app, args), f"another training run is writing to {out}")
        assert first.poll() is None, "the first run was disturbed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    os.close(RunDir(out, out)._lock())  # free again: the killed process's lock went with it
