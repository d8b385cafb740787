"""`debias sample`: output kinds, and one-line errors that leave nothing behind."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from debias.checkpoints import Checkpoint, save_checkpoint
from debias.cli import app
from debias.config import Config, DataConfig, DiffusionConfig
from debias.models.unet import UNetModel

UNET = dict(image_size=8, in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1,
            attention_resolutions=[2], channel_mult=(1, 2), num_head_channels=16)


def write_checkpoint(path, unet_kwargs=UNET, num_classes=None, noise=0.0):
    """A checkpoint of a fresh UNet; ``noise`` > 0 perturbs every weight (the output conv starts at zero)."""
    config = Config(target="v", data=DataConfig(image_size=8, channels=1),
                    diffusion=DiffusionConfig(steps=100, schedule="cosine")).to_dict()
    torch.manual_seed(0)
    model = UNetModel(**dict(UNET, num_classes=num_classes))
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    save_checkpoint(path, Checkpoint(config=config, unet_kwargs=dict(unet_kwargs, num_classes=num_classes),
                                     model=model.state_dict()))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def invoke(*args):
    return CliRunner().invoke(app, ["sample", *map(str, args)])


def test_sample_png_grid(checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    result = invoke(checkpoint, "--solver", "unipc", "--steps", 4, "-n", 6, "--seed", 1, "--out", out,
                    "--batch-size", 4)
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.mode == "L" and image.size == (2 + 3 * 10, 2 + 2 * 10)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


@pytest.mark.parametrize("solver,extra", [("ddpm", []), ("ddim", ["--eta", "0.5"]), ("dpmsolver++", ["--order", "3"])])
def test_sample_npz_is_batch_size_invariant(checkpoint, tmp_path, solver, extra):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for out, batch in [(a, 5), (b, 2)]:
        result = invoke(checkpoint, "--solver", solver, "--steps", 3, "-n", 5, "--out", out, "--batch-size", batch,
                        *extra)
        assert result.exit_code == 0, result.output
    with np.load(a) as data:
        images = data["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 1, 8, 8)
    with np.load(b) as data:
        np.testing.assert_array_equal(data["images"], images)


def test_sample_png_folder_and_class_labels(tmp_path):
    ckpt = write_checkpoint(tmp_path / "cond.pt", num_classes=10)
    result = invoke(ckpt, "--solver", "ddim", "--steps", 2, "-n", 3, "--out-dir", tmp_path / "pngs",
                    "--class-label", 3, "--class-label", 7, "--no-ema", "--no-clip")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    result = invoke(ckpt, "--steps", 2, "-n", 3, "--out", tmp_path / "x.npz", "--class-label", 10)
    assert result.exit_code == 2 and "out of range" in result.output
    assert not (tmp_path / "x.npz").exists()


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("case", ["missing", "corrupt", "wrong_shape", "unknown_solver", "too_many_steps",
                                  "bad_suffix", "bad_option", "no_output", "unknown_precision", "fp16_on_cpu"])
def test_errors_are_one_line_and_write_nothing(checkpoint, tmp_path, case):
    out = tmp_path / "out" / "grid.png"
    args, words = [checkpoint, "--steps", 3, "-n", 2, "--out", out], []
    if case == "missing":
        args[0], words = tmp_path / "nope.pt", ["not found"]
    elif case == "corrupt":
        args[0] = tmp_path / "corrupt.pt"
        args[0].write_bytes(checkpoint.read_bytes()[:500])
        words = ["corrupt"]
    elif case == "wrong_shape":
        args[0] = write_checkpoint(tmp_path / "wide.pt", unet_kwargs=dict(UNET, model_channels=64))
        words = ["does not fit the model", "shape"]
    elif case == "unknown_solver":
        args, words = args + ["--solver", "euler"], ["--solver", "euler", "ddpm", "unipc"]
    elif case == "too_many_steps":
        args, words = args + ["--solver", "ddim"], ["101 steps", "100"]
        args[2] = 101
    elif case == "bad_suffix":
        args[-1], words = tmp_path / "out" / "grid.jpg", [".jpg"]
    elif case == "bad_option":
        args, words = args + ["--solver", "ddim", "--order", 2], ["order", "ddim"]
    elif case == "unknown_precision":
        args, words = args + ["--precision", "int8"], ["precision", "int8", "fp16"]
    elif case == "fp16_on_cpu":
        args, words = args + ["--precision", "fp16"], ["fp16 needs CUDA"]
    else:
        args, words = args[:-2], ["--out"]
    assert_one_line_error(invoke(*args), *words)
    assert not (tmp_path / "out").exists()


def test_bf16_sampling_from_the_cli_stays_close_to_fp32(tmp_path):
    """--precision bf16 runs the network under bf16 autocast: the uint8 images differ, by a few levels."""
    checkpoint, images = write_checkpoint(tmp_path / "model.pt", noise=0.05), {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.npz"
        result = invoke(checkpoint, "--solver", "ddim", "--steps", 5, "-n", 4, "--out", out, "--precision", precision)
        assert result.exit_code == 0, result.output
        with np.load(out) as data:
            images[precision] = data["images"].astype(np.int16)
    diff = np.abs(images["bf16"] - images["fp32"])
    print(f"bf16 vs fp32: mean |diff| {diff.mean():.2f}, max {diff.max()} levels")
    assert 0 < diff.max() <= 16 and diff.mean() <= 2


def test_sigint_keeps_the_finished_chunks_and_the_rerun_gives_the_same_file(tmp_path):
    """Ctrl-C during `debias sample`: it stops before the next network call, keeps every finished chunk, says how
    many in one line and exits with 130; the rerun samples only the rest and writes what one run writes."""
    checkpoint = write_checkpoint(tmp_path / "model.pt", noise=0.05)
    out, straight, chunks = tmp_path / "out.npz", tmp_path / "straight.npz", tmp_path / ".out.npz.chunks"
    cmd = [sys.executable, "-m", "debias", "sample", str(checkpoint), "--solver", "ddim", "--steps", "10", "-n", "60",
           "--chunk-size", "4", "--batch-size", "4"]
    proc = subprocess.Popen([*cmd, "--out", str(out)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not list(chunks.glob("*.npz")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    kept = sorted(p.name for p in chunks.glob("*.npz"))
    assert proc.returncode == 128 + signal.SIGINT and 1 <= len(kept) < 15 and not out.exists(), stderr
    assert stderr.splitlines()[-1:] == [f"interrupted (SIGINT): {len(kept)} of 15 chunks of {out} are on disk in "
                                        f"{chunks}; run the same command again to resume"]
    assert not [line for line in stderr.splitlines()[:-1] if "interrupted" in line or "rror" in line], stderr
    resumed, once = (subprocess.run([*cmd, "--out", str(path)], cwd=tmp_path, capture_output=True, text=True,
                                    timeout=300) for path in (out, straight))
    assert resumed.returncode == 0 and once.returncode == 0, resumed.stderr + once.stderr
    assert f"{out}: {len(kept)} of 15 chunks already sampled" in resumed.stderr
    assert out.read_bytes() == straight.read_bytes() and not chunks.exists()
