"""Real scale: device defaults, sampling streamed to disk in chunks and resumed after a kill, and
torchrun processes that give bitwise what one process gives (the pipeline's stages under torchrun and
killed: tests/test_pipeline.py)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import debias.runtime as runtime
from debias.checkpoints import Checkpoint, save_checkpoint
from debias.cli import app
from debias.config import AnalyzeConfig, Config, DataConfig, DiffusionConfig, EvalConfig, SampleConfig
from debias.images import read_npz
from debias.models.unet import UNetModel
from debias.npz import members
from debias.sampling import Sampling, generate, load_sampling, plan_for
from debias.streaming import sample_to_file

from processes import chunk_names, kill_at_chunks

UNET = dict(image_size=8, in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1,
            attention_resolutions=[2], channel_mult=(1, 2), num_head_channels=16)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
RESUMED = re.compile(r"(\d+) of (\d+) chunks already sampled; sampling (.*)$", re.M)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A v-prediction UNet on 8×8 grey images with perturbed weights (so that samples vary)."""
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    config = Config(target="v", data=DataConfig(image_size=8, channels=1),
                    diffusion=DiffusionConfig(steps=100, schedule="cosine")).to_dict()
    torch.manual_seed(0)
    model = UNetModel(**UNET)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(path, Checkpoint(config=config, unet_kwargs=dict(UNET, num_classes=None), model=model.state_dict()))
    return path


def range_names(text: str) -> set[str]:
    """The chunk files a log line's ``sampling a-b, c-d`` names."""
    if text == "none":
        return set()
    return {f"{int(a):08d}-{int(b):08d}.npz" for a, b in (part.split("-") for part in text.split(", "))}


# ============================================================================ devices


def test_device_defaults_are_auto():
    assert SampleConfig().device == EvalConfig().device == AnalyzeConfig().device == "auto"
    for command in ("sample", "fid", "analyze"):
        assert "auto" in CliRunner().invoke(app, [command, "--help"], terminal_width=200).output


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    runtime.relaunch_on_all_gpus("auto", ["stages/sample.py", "ddim"])  # returns: nothing to relaunch


def test_auto_selects_cuda_and_relaunches_on_every_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runtime.resolve_device("auto") == torch.device("cuda", 0)
    assert runtime.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)

    class Relaunched(Exception):
        pass

    def execvp(program, argv):
        raise Relaunched(argv)

    monkeypatch.setattr(os, "execvp", execvp)
    with pytest.raises(Relaunched) as stage:
        runtime.relaunch_on_all_gpus("auto", ["stages/evaluate.py", "ddim"])
    assert stage.value.args[0][1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                       "stages/evaluate.py", "ddim"]
    monkeypatch.setattr(sys, "argv", ["debias", "sample", "model.pt", "-n", "3"])
    with pytest.raises(Relaunched) as command:
        CliRunner().invoke(app, ["sample", "model.pt", "-n", "3", "--out", "x.npz"], catch_exceptions=False)
    assert command.value.args[0][-6:] == ["-m", "debias", "sample", "model.pt", "-n", "3"]
    runtime.relaunch_on_all_gpus("cpu", ["stages/evaluate.py", "ddim"])  # cpu never relaunches
    monkeypatch.setenv("WORLD_SIZE", "2")
    runtime.relaunch_on_all_gpus("auto", ["stages/evaluate.py", "ddim"])  # already under torchrun


def test_shards_are_whole_batches():
    for n, world, unit in [(10, 3, 1), (10, 3, 4), (7, 2, 4), (3, 4, 4), (0, 2, 4), (65, 2, 64)]:
        sizes = runtime.shard_sizes(n, world, unit)
        assert sum(sizes) == n and len(sizes) == world
        starts = np.cumsum([0, *sizes[:-1]])
        assert all(start % unit == 0 for start, size in zip(starts, sizes) if size)
    assert runtime.shard_sizes(7, 2, 4) == [4, 3] and runtime.shard_sizes(10, 3, 1) == [4, 3, 3]


# ============================================================================ streaming and resuming


def sampler_for(checkpoint: Path, num_samples: int = 10, **changes) -> Sampling:
    cfg = replace(SampleConfig(), **{"batch_size": 4, "seed": 5, "device": "cpu", **changes})
    return load_sampling(checkpoint, plan_for("ddim", cfg), [3], num_samples)


class Killed(Exception):
    """Stands for a SIGKILL in the middle of a run."""


def test_streamed_file_equals_the_in_memory_samples(checkpoint, tmp_path):
    sampler = sampler_for(checkpoint)
    sampled = sample_to_file(sampler, 3, 10, tmp_path / "x.npz", "npz", tmp_path / "chunks", chunk_size=3)
    assert sampled == 4  # 0-3, 3-6, 6-9, 9-10
    expected = generate(sampler.model, sampler.plan, 3, 10)
    assert torch.equal(read_npz(tmp_path / "x.npz"), expected)
    assert chunk_names(tmp_path / "chunks") == set()  # the chunk files are removed, the settings kept
    assert json.loads((tmp_path / "chunks" / "settings.json").read_text())["chunk_size"] == 3


def test_a_rerun_samples_only_the_missing_chunks(checkpoint, tmp_path, monkeypatch):
    reference = tmp_path / "reference.npz"
    sample_to_file(sampler_for(checkpoint), 3, 10, reference, "npz", tmp_path / "ref_chunks", chunk_size=3)
    sampled: list[list[int]] = []
    original = Sampling.samples

    def spy(self, steps, indices, progress=None):
        if len(sampled) == 2 and kill:
            raise Killed
        sampled.append(list(indices))
        return original(self, steps, indices, progress)

    monkeypatch.setattr(Sampling, "samples", spy)
    out, chunks = tmp_path / "x.npz", tmp_path / "chunks"
    kill = True
    with pytest.raises(Killed):
        sample_to_file(sampler_for(checkpoint), 3, 10, out, "npz", chunks, chunk_size=3)
    assert not out.exists() and chunk_names(chunks) == {"00000000-00000003.npz", "00000003-00000006.npz"}
    (chunks / "00000003-00000006.npz").write_bytes(b"torn")  # a chunk that is not a complete file is resampled
    (chunks / ".00000006-00000009.npz.x.tmp").write_bytes(b"a killed writer's temporary file")
    kill, sampled = False, []
    assert sample_to_file(sampler_for(checkpoint, batch_size=2), 3, 10, out, "npz", chunks, chunk_size=3) == 3
    assert sampled == [[3, 4, 5], [6, 7, 8], [9]]
    assert out.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in chunks.iterdir()) == ["settings.json"]


def test_other_settings_never_mix_chunks(checkpoint, tmp_path, monkeypatch):
    chunks = tmp_path / "chunks"
    for name, changes in [("seed", {"seed": 6}), ("steps", {}), ("ema", {"ema": False})]:
        sample_to_file(sampler_for(checkpoint), 3, 10, tmp_path / "first.npz", "npz", chunks, 3, keep_chunks=True)
        steps = 2 if name == "steps" else 3
        assert sample_to_file(sampler_for(checkpoint, **changes), steps, 10, tmp_path / "x.npz", "npz", chunks, 3) == 4, name
        fresh = tmp_path / f"fresh_{name}.npz"
        sample_to_file(sampler_for(checkpoint, **changes), steps, 10, fresh, "npz", tmp_path / f"fresh_{name}", 3)
        assert (tmp_path / "x.npz").read_bytes() == fresh.read_bytes(), name
    # another chunk size re-cuts the run: nothing of the old cut is kept
    sample_to_file(sampler_for(checkpoint), 3, 10, tmp_path / "first.npz", "npz", chunks, 3, keep_chunks=True)
    assert sample_to_file(sampler_for(checkpoint), 3, 10, tmp_path / "x.npz", "npz", chunks, 4) == 3
    assert (tmp_path / "x.npz").read_bytes() == (tmp_path / "first.npz").read_bytes()


@pytest.mark.parametrize("kind,member", [("adm", "arr_0"), ("float32", "images")])
def test_every_npz_kind_is_assembled_from_chunks(checkpoint, tmp_path, kind, member):
    sampler = sampler_for(checkpoint, num_samples=5)
    sample_to_file(sampler, 3, 5, tmp_path / "x.npz", kind, tmp_path / "chunks", chunk_size=2)
    expected = generate(sampler.model, sampler.plan, 3, 5).numpy()
    info = members(tmp_path / "x.npz")
    assert list(info) == [member]
    with np.load(tmp_path / "x.npz") as data:
        got = data[member]
    if kind == "adm":
        np.testing.assert_array_equal(got, expected.transpose(0, 2, 3, 1))
    else:
        assert got.dtype == np.float32 and got.shape == (5, 1, 8, 8)


def test_bad_chunk_size_is_one_line(checkpoint, tmp_path):
    result = CliRunner().invoke(app, ["sample", str(checkpoint), "-n", "3", "--steps", "2", "--chunk-size", "0",
                                      "--device", "cpu", "--out", str(tmp_path / "x.npz")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "chunk_size" in lines[0] and ">= 1" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


# ============================================================================ processes and kills (subprocesses)


def sample_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "debias", "sample", str(checkpoint), "--device", "cpu", "--solver", "ddpm", "--seed", "2",
            "--out", str(out), *extra]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--format", "debias"], ["--format", "adm"]])
def test_torchrun_sample_equals_one_process(checkpoint, tmp_path, extra):
    # 7 samples: not divisible by the 2 processes, the chunk size 3 or the batch size 2
    common = ["--steps", "4", "-n", "7", "--chunk-size", "3", "--batch-size", "2", *extra]
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    subprocess.run([sys.executable, *sample_args(checkpoint, one, *common)], check=True, env=ENV, timeout=120,
                   capture_output=True)
    done = subprocess.run([*TORCHRUN, *sample_args(checkpoint, two, *common)], env=ENV, timeout=180,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("7 samples") == 1  # rank 0 reports (and writes) alone
    assert two.read_bytes() == one.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "two.npz"]


@pytest.mark.slow
def test_sigkill_sample_resumes_with_only_the_missing_chunks(checkpoint, tmp_path):
    """Killed after a random number of new chunks, again and again: every rerun says which chunks it found and
    samples exactly the missing ones; the last writes bitwise what an uninterrupted run writes."""
    args = ["--steps", "20", "-n", "600", "--chunk-size", "50"]
    reference = tmp_path / "reference.npz"
    subprocess.run([sys.executable, *sample_args(checkpoint, reference, *args)], check=True, env=ENV, timeout=300,
                   capture_output=True)
    out = tmp_path / "run" / "x.npz"
    out.parent.mkdir()
    chunks = out.parent / ".x.npz.chunks"
    cmd = [sys.executable, *sample_args(checkpoint, out, *args)]
    rng, resumed_runs = random.Random(0), 0
    for attempt in range(13):
        before = chunk_names(chunks)
        log = tmp_path / f"attempt{attempt}.log"
        with log.open("w") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=ENV)
            target = len(before) + rng.randint(1, 4)  # 12 chunks in all: from there on it runs to the end
            if target < 12:
                kill_at_chunks(proc, [chunks], target)
            proc.wait(timeout=300)
        lines = RESUMED.findall(log.read_text())
        if before:  # a rerun says which chunks it found and which it samples: exactly the missing ones
            found, total, sampling = lines[0]
            assert (int(found), int(total)) == (len(before), 12)
            assert range_names(sampling) == {f"{a:08d}-{a + 50:08d}.npz" for a in range(0, 600, 50)} - before
            resumed_runs += 1
        else:
            assert not lines
        if proc.returncode == 0:
            break
        # killed before the final rename: no file; after it (before the exit): the finished file
        assert not out.exists() or out.read_bytes() == reference.read_bytes()
    assert proc.returncode == 0 and resumed_runs >= 1, "no kill landed mid-way"
    assert out.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.npz"]
