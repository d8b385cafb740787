"""The prepared set: one uint8 array written block by block and read as a memory map — streamed training equal
to in-memory training bit for bit (killed and resumed, and under two gloo processes), and forged or truncated
files refused in one line before anything large is allocated."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from debias.checkpoints import load_checkpoint
from debias.config import DataConfig, config_from_dict
from debias.data.datasets import folder_blocks, load_dataset, source_of
from debias.data.prepared import HEADER_BYTES, IMAGES, LABELS, META, open_prepared, write_prepared
from debias.errors import DebiasError
from debias.train.loop import train
from debias.train.rundir import CHECKPOINT

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"model_channels": 32, "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [],
              "dropout": 0.1},
    "data": {"name": "folder", "image_size": 8, "channels": 3, "random_flip": True, "class_cond": True},
    "train": {"steps": 12, "batch_size": 16, "log_every": 3, "checkpoint_every": 5, "warmup_steps": 4,
              "snapshot_steps": [], "data_loading": "stream"},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """40 colour PNGs of 10×12 in two class folders, and one corrupt file."""
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for i in range(40):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:03d}.png")
    (root / "c0" / "broken.png").write_bytes(b"not a png")
    return root


def tiny(folder: Path, *overrides: str):
    return config_from_dict(TINY, [f"data.path={folder}", *overrides])


def test_the_prepared_set_holds_the_decoded_images(folder, tmp_path):
    cfg = tiny(folder)
    prepared = write_prepared(tmp_path / "set", folder_blocks(cfg.data), source_of(cfg.data))
    loaded = load_dataset(cfg.data)
    assert len(prepared) == len(loaded) == 40 and prepared.num_classes == 2
    assert torch.equal(torch.from_numpy(np.asarray(prepared.images.array)).float().div(127.5).sub(1), loaded.images)
    assert torch.equal(prepared.labels, loaded.labels)
    assert prepared.meta["skipped"] == [["c0/broken.png", prepared.meta["skipped"][0][1]]]
    assert np.load(tmp_path / "set" / IMAGES, mmap_mode="r").shape == (40, 3, 8, 8)  # any NumPy reads it


def test_streamed_training_equals_in_memory_training_and_resumes_bitwise(folder, tmp_path):
    cfg = tiny(folder)
    prepared = write_prepared(tmp_path / "set", folder_blocks(cfg.data), source_of(cfg.data))
    train(tiny(folder, "train.data_loading=memory"), tmp_path / "memory", prepared, progress=False)
    train(cfg, tmp_path / "stream", prepared, progress=False, stop_after=7)  # stopped as a kill would
    train(cfg, tmp_path / "stream", prepared, progress=False)
    a, b = load_checkpoint(tmp_path / "memory" / CHECKPOINT), load_checkpoint(tmp_path / "stream" / CHECKPOINT)
    assert a.step == b.step == 12
    assert all(torch.equal(value, b.model[name]) for name, value in a.model.items())
    assert all(torch.equal(value, b.ema[key][name]) for key, state in a.ema.items() for name, value in state.items())


def cli(tmp_path: Path, folder: Path, out: Path, overrides: list[str], launcher: list[str] | None = None) -> list[str]:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY))
    sets = [arg for o in [f"data.path={folder}", *overrides] for arg in ("--set", o)]
    return [*(launcher or [sys.executable]), "-m", "debias", "train", "--params", str(params), "--out", str(out),
            "--no-progress", *sets]


@pytest.mark.slow
def test_debias_train_on_a_folder_killed_and_rerun_is_bitwise(folder, tmp_path):
    """`debias train` prepares the folder beside the run, streams it, is SIGKILLed mid-way and rerun: the
    weights equal an uninterrupted in-memory run's."""
    overrides = ["train.steps=40", "train.checkpoint_every=8"]
    out = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(cli(tmp_path, folder, out, overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    killed_at = load_checkpoint(out / CHECKPOINT).step
    assert 0 < killed_at < 40, "the run was not killed mid-way"
    rerun = subprocess.run(cli(tmp_path, folder, out, overrides), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert "reusing the prepared images" in rerun.stderr and f"resuming at step {killed_at}" in rerun.stderr
    cfg = tiny(folder, *overrides, "train.data_loading=memory")
    train(cfg, tmp_path / "reference", load_dataset(cfg.data), progress=False)
    a, b = load_checkpoint(out / CHECKPOINT), load_checkpoint(tmp_path / "reference" / CHECKPOINT)
    assert a.step == b.step == 40
    assert all(torch.equal(value, b.model[name]) for name, value in a.model.items())


@pytest.mark.slow
def test_two_gloo_processes_streaming_match_one(folder, tmp_path):
    overrides = ["train.steps=4", "train.warmup_steps=0", "train.lr=0.0001", "model.dropout=0.0"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(cli(tmp_path, folder, tmp_path / "runs" / "ddp", overrides, launcher), timeout=180,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = tiny(folder, *overrides)
    train(cfg, tmp_path / "single", open_prepared(next((tmp_path / "runs").glob("prepared-*"))), progress=False)
    ddp, single = load_checkpoint(tmp_path / "runs" / "ddp" / CHECKPOINT), load_checkpoint(tmp_path / "single" / CHECKPOINT)
    assert ddp.step == single.step == 4
    for name, value in single.model.items():
        torch.testing.assert_close(ddp.model[name], value, atol=1e-5, rtol=0)


def forge(folder: Path, case: str) -> None:
    """Damage a prepared set the way a truncated copy or a hostile file would."""
    images = folder / IMAGES
    if case == "truncated":
        with open(images, "r+b") as f:
            f.truncate(images.stat().st_size - 10)
    elif case == "huge shape":  # a header that claims 10^15 bytes in a small file
        header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1000000000, 3, 1000, 333), }"
        raw = b"\x93NUMPY\x01\x00" + (HEADER_BYTES - 10).to_bytes(2, "little") + header.ljust(HEADER_BYTES - 11).encode() + b"\n"
        images.write_bytes(raw + images.read_bytes()[HEADER_BYTES:])
    elif case == "dtype":
        np.save(images, np.zeros((40, 3, 8, 8), np.float32))
    elif case == "shape":
        np.save(images, np.zeros((40, 8, 8, 3), np.uint8))
    elif case == "header larger than the file":
        images.write_bytes(b"\x93NUMPY\x01\x00" + (60000).to_bytes(2, "little") + b"{'descr'")
    elif case == "labels":
        np.save(folder / LABELS, np.full(40, 7, np.int64))
    elif case == "meta":
        (folder / META).write_text(json.dumps({"count": 41, "image_shape": [3, 8, 8]}))


@pytest.mark.parametrize("case", ["truncated", "huge shape", "dtype", "shape", "header larger than the file", "labels",
                                  "meta"])
def test_a_forged_or_truncated_set_is_one_line(folder, tmp_path, case):
    cfg = tiny(folder)
    write_prepared(tmp_path / "data" / "prepared", folder_blocks(cfg.data), source_of(cfg.data))
    forge(tmp_path / "data" / "prepared", case)
    with pytest.raises(DebiasError):
        open_prepared(tmp_path / "data" / "prepared")
    # the train stage, as `dvc repro` runs it: one line, exit code 2, no traceback
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(name="folder", path=str(folder), image_size=8, channels=3, class_cond=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, str(REPO / "stages" / "train.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "prepared" in lines[0], lines


def test_a_folder_settings_change_prepares_again(folder, tmp_path):
    """`debias train`'s set beside the run is reused only while the folder and the data settings match."""
    from debias.data.datasets import training_set

    cfg = DataConfig(name="folder", path=str(folder), image_size=8, channels=3)
    first = training_set(cfg, tmp_path)
    assert training_set(cfg, tmp_path).meta == first.meta
    (folder / "c1" / "new.png").write_bytes((folder / "c1" / "001.png").read_bytes())
    try:
        again = training_set(cfg, tmp_path)
        assert len(again) == len(first) + 1 and again.folder == first.folder
    finally:
        (folder / "c1" / "new.png").unlink()
    other = training_set(DataConfig(name="folder", path=str(folder), image_size=4, channels=3), tmp_path)
    assert other.folder != first.folder and other.image_shape == (3, 4, 4)
