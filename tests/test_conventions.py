"""What users of DVC, Typer and a shared machine expect: file permissions, start-up, choices,
--version, where the CLI writes, progress without a terminal."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from debias.checkpoints import Checkpoint, save_checkpoint
from debias.images import save_npz
from debias.io import write_json, write_tsv


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_tsv(tmp_path / "a.tsv", [{"x": 1}])
        save_npz(np.zeros((1, 1, 4, 4), np.uint8), tmp_path / "a.npz")
        save_checkpoint(tmp_path / "a.pt", Checkpoint(config={}, unet_kwargs={}, model={"w": torch.zeros(1)}))
    finally:
        os.umask(previous)
    for name in ("a.json", "a.tsv", "a.npz", "a.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def debias_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "debias", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("argv", [["--help"], ["sample", "--help"], ["train", "--help"], ["--version"]])
def test_commands_that_need_no_model_never_import_torch(argv):
    """Start-up is Typer and the catalogue of names only (`debias --help` in ~0.1 s, not 2.7 s)."""
    code = ("import sys\nfrom debias.cli import main\nsys.argv = ['debias', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_version():
    from debias import __version__

    result = debias_cli("--version")
    assert result.returncode == 0 and result.stdout == f"debias {__version__}\n"


def test_shell_completion_offers_the_registered_names():
    from debias.catalog import SOLVERS, WEIGHTINGS

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        result = debias_cli(env={"_DEBIAS_COMPLETE": "complete_bash", "COMP_WORDS": line,
                                 "COMP_CWORD": str(len(words) - 1)})
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert complete("debias sample m.pt --solver ") == list(SOLVERS)
    assert complete("debias sample m.pt --solver dpm") == [s for s in SOLVERS if s.startswith("dpm")]
    assert complete("debias train --weighting ") == list(WEIGHTINGS)
    assert "train" in complete("debias tr")


@pytest.mark.parametrize("args,words", [
    (["train", "--weighting", "nope"], ["--weighting", "nope", "debias", "min_snr"]),
    (["train", "--target", "eps2"], ["--target", "eps2", "x0"]),
    (["sample", "m.pt", "--spacing", "odd"], ["--spacing", "odd", "trailing"]),
    (["sample", "m.pt", "--precision", "fp8"], ["--precision", "fp8", "bf16"]),
])
def test_choices_are_one_line_errors_naming_the_choices(args, words):
    result = debias_cli(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert all(word in result.stderr for word in words), result.stderr
