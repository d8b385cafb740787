"""Reliability, round two: hostile checkpoints and .npz files, disk full, special files.

Each case runs the real CLI in a subprocess under an 8 GiB address-space cap (``RLIMIT_AS``), so a
regression cannot take the machine down, and measures the child's peak resident memory: every case
is one ``error:`` line, exit 2, and the bombs stay below 1 GiB.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import tracemalloc
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from debias.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from debias.config import Config
from debias.models.unet import UNetModel
from debias.npz import members, open_member

GIB = 1 << 30
KWARGS = dict(image_size=8, in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1,
              attention_resolutions=(), channel_mult=(1,), num_head_channels=16)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int


def capped(*args: str | Path, cwd: Path | None = None, fsize: int | None = None) -> Outcome:
    """``debias ARGS`` under an 8 GiB address-space cap (and a file-size cap ``fsize``), with its peak RSS."""

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 * GIB, 8 * GIB))
        if fsize is not None:
            import signal

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    proc = subprocess.Popen([sys.executable, "-m", "debias", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=limits, cwd=cwd)  # pipes: not capped
    output: dict[str, str] = {}
    readers = [threading.Thread(target=lambda name=name, stream=stream: output.update({name: stream.read()}))
               for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for reader in readers:
        reader.start()
    watchdog = threading.Timer(300, proc.kill)  # a hang fails the test instead of the suite
    watchdog.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak resident memory
    watchdog.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    return Outcome(proc.returncode, output["stdout"], output["stderr"], usage.ru_maxrss * 1024)


def assert_one_line(outcome: Outcome, *words: str) -> None:
    """Exit 2 and one ``error:`` line on stderr, after at most progress lines and notes (no traceback)."""
    lines = outcome.stderr.strip().splitlines()
    assert outcome.returncode == 2, outcome.stderr[-2000:]
    assert lines and lines[-1].startswith("error: "), outcome.stderr[-2000:]
    assert all(re.search(r"\(\d+ %\)", line) or line.startswith("note: ") for line in lines[:-1]), \
        outcome.stderr[-2000:]
    for word in words:
        assert word in lines[-1], lines[-1]


def tiny_checkpoint(path: Path, **changes) -> Checkpoint:
    torch.manual_seed(0)
    model = UNetModel(**KWARGS).state_dict()
    cfg = Config().to_dict()
    cfg["diffusion"] = {"steps": 50, "schedule": "linear"}
    ckpt = Checkpoint(config=cfg, unet_kwargs=dict(KWARGS), model=model,
                      ema={"0.999": {k: v.clone() for k, v in model.items()}}, step=10)
    for key, value in changes.items():
        setattr(ckpt, key, value)
    save_checkpoint(path, ckpt)
    return ckpt


def raw_checkpoint(path: Path, edit) -> None:
    """A checkpoint saved as a plain dict after ``edit(dict)`` (no validation on the way in)."""
    tiny_checkpoint(path)
    blob = torch.load(path, weights_only=True)
    edit(blob)
    torch.save(blob, path)


def zeros_stream(out, nbytes: int, block: int = 64 << 20) -> None:
    zero = bytes(block)
    while nbytes > 0:
        out.write(zero[:min(block, nbytes)])
        nbytes -= block


def inflating_member_zip(src: Path, dst: Path, nbytes: int) -> None:
    """``src`` (a torch zip) with its first tensor record replaced by ``nbytes`` of deflated zeros."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        replaced = False
        for info in zin.infolist():
            if not replaced and "/data/" in info.filename:
                bomb = zipfile.ZipInfo(info.filename)
                bomb.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(bomb, "w", force_zip64=True) as out:
                    zeros_stream(out, nbytes)
                replaced = True
            else:
                zout.writestr(info, zin.read(info))


def npz_bomb(path: Path, dtype: str, shape: tuple[int, ...]) -> None:
    """An .npz whose one member inflates to the whole declared array of zeros."""
    info = zipfile.ZipInfo("images.npy")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w") as archive, archive.open(info, "w", force_zip64=True) as out:
        np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                   "shape": shape})
        zeros_stream(out, int(np.prod(shape)) * np.dtype(dtype).itemsize)


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture
def good(tmp_path) -> Path:
    tiny_checkpoint(tmp_path / "good.pt")
    return tmp_path / "good.pt"


def sample(checkpoint: Path, tmp_path: Path) -> Outcome:
    return capped("sample", checkpoint, "-n", "2", "--steps", "2", "--solver", "ddim", "--out", tmp_path / "x.npz",
                  "--device", "cpu", "-S", "sample.chunk_size=2")


def test_a_good_checkpoint_samples(good, tmp_path):
    outcome = sample(good, tmp_path)
    assert outcome.returncode == 0, outcome.stderr
    assert (tmp_path / "x.npz").is_file()


@pytest.mark.slow
def test_a_checkpoint_zip_that_inflates_is_refused_before_inflating(good, tmp_path):
    inflating_member_zip(good, tmp_path / "bomb.pt", 3 * GIB // 2)
    assert (tmp_path / "bomb.pt").stat().st_size < 16 << 20
    outcome = sample(tmp_path / "bomb.pt", tmp_path)
    assert_one_line(outcome, str(tmp_path / "bomb.pt"), "compressed")
    assert outcome.peak_bytes < GIB
    assert not (tmp_path / "x.npz").exists()


HOSTILE_MODELS = {
    "model_channels=8192": lambda b: b["unet_kwargs"].update(model_channels=8192),
    "num_res_blocks=10**6": lambda b: b["unet_kwargs"].update(num_res_blocks=10**6),
    "image_size=10**6": lambda b: b["unet_kwargs"].update(image_size=10**6),
    "channel_mult of 100 levels": lambda b: b["unet_kwargs"].update(channel_mult=[1] * 100),
    "diffusion.steps=10**12": lambda b: b["config"]["diffusion"].update(steps=10**12),
    "ema a list": lambda b: b.update(ema=[1, 2]),
    "ema a dict of ints": lambda b: b.update(ema={"0.999": 3}),
    "a model entry a string": lambda b: b["model"].update({"out.2.bias": "zeros"}),
    "step=-5": lambda b: b.update(step=-5),
    "step a bool": lambda b: b.update(step=True),
    "unet_kwargs a string": lambda b: b.update(unet_kwargs="big"),
    "NaN weights": lambda b: b["ema"]["0.999"]["out.2.weight"].fill_(float("nan")),
    "inf weights in the raw model": lambda b: b["model"]["out.2.bias"].fill_(float("inf")),
    "a 100000-deep nested value": None,  # written by write_deep_checkpoint
}


@pytest.mark.parametrize("case", list(HOSTILE_MODELS))
def test_hostile_checkpoints_are_one_line_before_any_allocation(good, tmp_path, case):
    if case == "a 100000-deep nested value":
        write_deep_checkpoint(good, tmp_path / "hostile.pt")
    else:
        blob = torch.load(good, weights_only=True)
        HOSTILE_MODELS[case](blob)
        torch.save(blob, tmp_path / "hostile.pt")
    outcome = sample(tmp_path / "hostile.pt", tmp_path)
    assert_one_line(outcome, "hostile.pt")
    assert outcome.peak_bytes < GIB
    assert not (tmp_path / "x.npz").exists()


def write_deep_checkpoint(good: Path, path: Path, depth: int = 100_000) -> None:
    """``good`` with ``extra["deep"]`` a ``depth``-deep nest of 1-tuples, written into the pickle by hand
    (torch.save would recurse)."""
    blob = torch.load(good, weights_only=True)
    blob["extra"] = {"deep": "PLACEHOLDER"}
    torch.save(blob, path)
    with zipfile.ZipFile(path) as zin:
        infos = zin.infolist()
        data = {info.filename: zin.read(info) for info in infos}
    pkl = next(name for name in data if name.endswith("data.pkl"))
    marker = b"X\x0b\x00\x00\x00PLACEHOLDER"  # BINUNICODE of the placeholder string
    assert data[pkl].count(marker) == 1
    data[pkl] = data[pkl].replace(marker, b"]" + b"\x85" * depth)  # EMPTY_LIST, then TUPLE1 depth times
    with zipfile.ZipFile(path, "w") as zout:
        for info in infos:
            zout.writestr(info, data[info.filename])


def test_a_flipped_byte_in_a_tensor_is_named(good, tmp_path):
    blob = good.read_bytes()
    with zipfile.ZipFile(good) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64)
        name_len, extra_len = np.frombuffer(blob[info.header_offset + 26:info.header_offset + 30], "<u2")
        start = info.header_offset + 30 + int(name_len) + int(extra_len)
    flipped = bytearray(blob)
    flipped[start + 5] ^= 0x10
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    outcome = sample(tmp_path / "flipped.pt", tmp_path)
    assert_one_line(outcome, "flipped.pt", "checksum")


def test_special_files_are_not_checkpoints(tmp_path):
    os.mkfifo(tmp_path / "fifo.pt")
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    for name in ("fifo.pt", "zero.pt"):
        outcome = sample(tmp_path / name, tmp_path)
        assert_one_line(outcome, name, "not a regular file")


RESUME_DAMAGE = {
    "a string weight": lambda b: b["model"].update({"out.2.bias": "zeros"}),
    "an int EMA": lambda b: b["ema"].update({"0.999": 7}),
    "a string optimizer": lambda b: b.update(optimizer="adam"),
    "rng={}": lambda b: b.update(rng={}),
    "logs=None": lambda b: b["extra"].update(logs=None),
    "a string step": lambda b: b.update(step="10"),
}


RESUME_MICRO = ["--no-progress", "-S", "train.checkpoint_every=2", "-S", "model.channel_mult=[1]",
                "-S", "model.attention_resolutions=[]", "-S", "diffusion.steps=50", "-S", "train.batch_size=8",
                "-S", "data.max_images=16"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A `debias train` run of 4 steps, written once for every damage below (each damages its own copy)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    first = capped("train", "--out", run, *RESUME_MICRO, "-S", "train.steps=4")
    assert first.returncode == 0, first.stderr
    return run


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_DAMAGE))
def test_resuming_from_a_damaged_checkpoint_is_one_line(trained_run, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    blob = torch.load(run / "checkpoint.pt", weights_only=True)
    RESUME_DAMAGE[case](blob)
    torch.save(blob, run / "checkpoint.pt")
    outcome = capped("train", "--out", run, *RESUME_MICRO, "-S", "train.steps=6")
    assert_one_line(outcome, "checkpoint.pt")


# ----------------------------------------------------------------------------- .npz and features

@pytest.mark.slow
@pytest.mark.parametrize("dtype,shape", [("<f8", (64 << 20, 1, 1, 1)), ("|u1", (33_554_432, 1, 8, 8))])
def test_npz_bombs_are_refused_before_inflating(tmp_path, dtype, shape):
    npz_bomb(tmp_path / "bomb.npz", dtype, shape)
    assert (tmp_path / "bomb.npz").stat().st_size < 16 << 20
    outcome = capped("fid", tmp_path / "bomb.npz", "digits", "--device", "cpu")
    assert_one_line(outcome, "bomb.npz")
    assert outcome.peak_bytes < GIB


def test_an_npz_header_declaring_a_billion_images_is_one_line(tmp_path):
    info = zipfile.ZipInfo("images.npy")
    with zipfile.ZipFile(tmp_path / "forged.npz", "w") as archive, archive.open(info, "w") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False,
                                                   "shape": (10**9, 1, 8, 8)})
        out.write(bytes(64 * 16))
    for compress in (False, True):
        if compress:
            with zipfile.ZipFile(tmp_path / "forged.npz") as src:
                data = src.read("images.npy")
            with zipfile.ZipFile(tmp_path / "forged.npz", "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr("images.npy", data)
        assert_one_line(capped("fid", tmp_path / "forged.npz", "digits", "--device", "cpu"), "forged.npz")


def test_zero_size_images_are_one_line(tmp_path):
    np.savez(tmp_path / "empty.npz", images=np.zeros((8, 1, 0, 0), np.uint8))
    assert_one_line(capped("fid", tmp_path / "empty.npz", "digits", "--device", "cpu"), "empty.npz")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_feature_files_with_non_finite_values_are_one_line(tmp_path, bad):
    from debias.metrics.features import save_features

    rng = np.random.default_rng(0)
    for name, value in (("a", None), ("b", bad)):
        features = torch.from_numpy(rng.normal(size=(40, 2048)))
        if value is not None:
            features[3, 7] = value
        save_features(tmp_path / f"{name}.npz", features, {"weights_sha256": "x" * 64})
    assert_one_line(capped("fid", tmp_path / "b.npz", tmp_path / "a.npz", "-m", "fid", "--device", "cpu"), "b.npz")


def test_reading_a_few_rows_of_a_compressed_member_inflates_only_those(tmp_path):
    images = np.random.default_rng(0).integers(0, 4, size=(1 << 18, 1, 8, 8), dtype=np.uint8)  # 16 MiB
    np.savez_compressed(tmp_path / "c.npz", images=images)
    member = members(tmp_path / "c.npz")["images"]
    tracemalloc.start()
    head = open_member(tmp_path / "c.npz", member, rows=16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(head, images[:16])
    assert peak < 1 << 20, peak


# ----------------------------------------------------------------------------- disk full, params

@pytest.mark.slow
def test_a_full_disk_while_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    micro = ["-S", "train.checkpoint_every=2", "-S", "model.channel_mult=[1]", "-S", "model.attention_resolutions=[]",
             "-S", "diffusion.steps=50", "-S", "train.batch_size=8", "-S", "data.max_images=16", "--no-progress"]
    assert capped("train", "--out", run, "-S", "train.steps=2", *micro).returncode == 0
    before = load_checkpoint(run / "checkpoint.pt")
    size = (run / "checkpoint.pt").stat().st_size
    outcome = capped("train", "--out", run, "-S", "train.steps=4", *micro, fsize=size // 2)
    assert_one_line(outcome, "checkpoint.pt")
    assert load_checkpoint(run / "checkpoint.pt").step == before.step == 2
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_while_sampling_leaves_no_half_written_output(good, tmp_path):
    out = tmp_path / "x.npz"
    outcome = capped("sample", good, "-n", "64", "--steps", "2", "--solver", "ddim", "--out", out, "--device", "cpu",
                     fsize=4096)
    assert_one_line(outcome)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_out_dir_is_written_whole_or_not_at_all(good, tmp_path):
    out = tmp_path / "pngs"
    outcome = capped("sample", good, "-n", "8", "--steps", "2", "--solver", "ddim", "--out-dir", out, "--device", "cpu",
                     "-S", "sample.chunk_size=2", fsize=1)
    assert_one_line(outcome)
    assert not out.exists()
    outcome = capped("sample", good, "-n", "8", "--steps", "2", "--solver", "ddim", "--out-dir", out, "--device", "cpu",
                     "-S", "sample.chunk_size=2")
    assert outcome.returncode == 0, outcome.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(8)]


def test_a_data_path_with_a_built_in_dataset_is_an_error():
    outcome = capped("config", "-S", "data.path=/nonexistent")
    assert_one_line(outcome, "data.path", "folder")
