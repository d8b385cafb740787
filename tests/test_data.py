"""Datasets: the built-ins, and image folders full of the odd files real folders contain."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from debias.cli import app
from debias.config import DataConfig
from debias.data.datasets import center_crop_arr, find_images, load_dataset
from debias.errors import DebiasError


def folder_cfg(path, **kw) -> DataConfig:
    return DataConfig(name="folder", path=str(path), **{"image_size": 8, "channels": 3, **kw})


def test_digits_in_range_with_labels():
    ds = load_dataset(DataConfig())
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.float32
    assert ds.images.min() == -1 and ds.images.max() == 1
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (1797,)
    assert ds.num_classes == 10 and set(ds.labels.tolist()) == set(range(10))


def test_digits_resized_rgb_and_limited():
    ds = load_dataset(DataConfig(image_size=16, channels=3, max_images=100))
    assert ds.images.shape == (100, 3, 16, 16)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert torch.equal(ds.images[:, 0], ds.images[:, 2]) and len(ds.labels) == 100


def test_twemoji_is_colour():
    ds = load_dataset(DataConfig(name="twemoji", image_size=8, channels=3))
    assert len(ds) > 1000 and ds.images.shape[1:] == (3, 8, 8) and ds.labels is None
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert (ds.images[:, 0] - ds.images[:, 2]).abs().mean() > 0.05  # red and blue differ: colour
    with pytest.raises(DebiasError, match="no class labels"):
        load_dataset(DataConfig(name="twemoji", image_size=8, channels=3, class_cond=True))


def test_center_crop_like_guided_diffusion():
    wide = Image.fromarray(np.concatenate([np.zeros((40, 40), np.uint8), np.full((40, 80), 255, np.uint8),
                                           np.zeros((40, 40), np.uint8)], axis=1))
    arr = center_crop_arr(wide, 8)  # 160x40 → BOX to 80x20 → 40x10 → BICUBIC to 32x8 → centre 8x8
    assert arr.shape == (8, 8) and arr.min() == 255  # only the white middle survives


@pytest.fixture
def messy(tmp_path):
    """A folder of the kinds of files a real image folder holds, good and bad."""
    root = tmp_path / "images"
    (root / "cats" / "deep").mkdir(parents=True)
    (root / "dogs").mkdir()
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:6, ..., 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "cats" / "a_rgba.png")
    Image.fromarray(np.full((10, 10), 50, np.uint8), "L").save(root / "cats" / "b_grey.jpg")
    pal = Image.fromarray(np.zeros((8, 8), np.uint8), "P")
    pal.putpalette([0, 0, 255] * 256)
    pal.info["transparency"] = 0
    pal.save(root / "cats" / "deep" / "c_palette.png", transparency=0)
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(root / "dogs" / "d_16bit.png")
    Image.new("CMYK", (9, 9), (0, 255, 255, 0)).save(root / "dogs" / "e_cmyk.jpg")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(root / "dogs" / "f_green.webp", lossless=True)
    good = (root / "dogs" / "f_green.webp").read_bytes()
    (root / "dogs" / "g_truncated.webp").write_bytes(good[: len(good) // 2])
    (root / "dogs" / "h_empty.png").write_bytes(b"")
    (root / "dogs" / "i_text.png").write_text("not an image")
    (root / "dogs" / "notes.txt").write_text("ignored: not an image suffix")
    os.symlink(root, root / "cats" / "loop")  # a symlink loop must not hang or duplicate files
    return root


def test_folder_reports_bad_files_and_converts_modes(messy, caplog):
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(folder_cfg(messy, class_cond=True))
    skipped = dict(ds.skipped)
    assert set(skipped) == {"dogs/g_truncated.webp", "dogs/h_empty.png", "dogs/i_text.png"}
    assert skipped["dogs/h_empty.png"] == "empty file"
    assert "cannot identify" in skipped["dogs/i_text.png"]
    assert "skipped 3 of 9 images" in caplog.text and "dogs/i_text.png" in caplog.text
    assert ds.images.shape == (6, 3, 8, 8) and ds.class_names == ["cats", "dogs"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    rgba, grey, palette, bit16, cmyk, green = ds.images
    assert torch.allclose(rgba[:, 0], torch.tensor([1.0, -1.0, -1.0])[:, None])  # opaque red on top
    assert (rgba[:, -1] == 1).all()                                                # transparent → white
    assert torch.allclose(grey, torch.full_like(grey, 50 / 127.5 - 1), atol=2 / 127.5)
    assert (palette == 1).all()                                                    # transparent index → white
    assert torch.allclose(bit16, torch.full_like(bit16, 128 / 127.5 - 1), atol=1e-6)  # 16-bit scaled to 8
    assert cmyk[0].mean() > 0.9 and cmyk[1:].mean() < -0.9                          # CMYK (0,255,255,0) = red
    assert torch.equal(green[1], torch.ones(8, 8)) and (green[0] == -1).all()


def test_a_grey_folder_as_rgb_and_a_colour_folder_as_grey_are_one_note(tmp_path, caplog):
    """A folder decoded into the other number of channels says so once per run (not per image), with the count;
    a folder already of data.channels says nothing."""
    grey, colour = tmp_path / "grey", tmp_path / "colour"
    for folder in (grey, colour):
        folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), "L").save(grey / f"{i}.png")
        Image.new("RGB", (8, 8), (50 * i, 0, 0)).save(colour / f"{i}.png")
    Image.new("RGB", (8, 8), (0, 9, 0)).save(grey / "x_one_in_colour.png")
    runs = {(grey, 3): f"note: 5 of the 6 images of {grey} are grey; converted to RGB (data.channels: 3)",
            (colour, 1): f"note: 5 of the 5 images of {colour} are in colour; converted to grey (data.channels: 1)",
            (colour, 3): None}
    for (folder, channels), note in runs.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="debias"):
            ds = load_dataset(folder_cfg(folder, channels=channels))
        assert ds.images.shape[1] == channels
        assert [r.getMessage() for r in caplog.records if "note:" in r.getMessage()] == ([note] if note else [])


def test_folder_fail_mode_names_the_file(messy):
    with pytest.raises(DebiasError, match=r"cannot read image .*g_truncated\.webp"):
        load_dataset(folder_cfg(messy, on_error="fail"))


def test_folder_decompression_bomb_is_a_bad_file(messy, monkeypatch):
    # 12x12 = 144 px is over twice the limit (PIL refuses it); 10x10 and 9x9 are over it (we refuse)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 70)
    ds = load_dataset(folder_cfg(messy))
    skipped = dict(ds.skipped)
    for name in ("cats/a_rgba.png", "cats/b_grey.jpg", "dogs/e_cmyk.jpg"):
        assert "possible decompression bomb" in skipped[name]
    assert len(ds) == 3


def test_folder_fatal_problems(tmp_path):
    with pytest.raises(DebiasError, match="data folder not found"):
        load_dataset(folder_cfg(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DebiasError, match="no images"):
        load_dataset(folder_cfg(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"")
    (bad / "y.jpg").write_text("text")
    with pytest.raises(DebiasError, match="no readable images .* all 2 failed"):
        load_dataset(folder_cfg(bad))
    with pytest.raises(DebiasError, match="class sub-folder"):
        Image.new("RGB", (8, 8)).save(bad / "z.png")
        load_dataset(folder_cfg(bad, class_cond=True))


def test_find_images_is_sorted_and_terminates(messy):
    names = [p.relative_to(messy).as_posix() for p in find_images(messy)]
    assert names == sorted(names) and len(names) == 9 and not any("loop" in n for n in names)


def test_cli_train_missing_folder_is_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  name: folder\n  path: does/not/exist\n")
    result = CliRunner().invoke(app, ["train", "--params", str(params), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data folder not found")
