"""Post-hoc EMA (EDM2): the power-function profiles, their reconstruction, and `debias phema`."""

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from debias import phema
from debias.checkpoints import load_checkpoint
from debias.cli import app
from debias.config import ConfigError, config_from_dict
from debias.errors import DebiasError
from debias.posthoc import reconstruct, snapshot_files
from debias.data.datasets import load_dataset
from debias.train.loop import train as train_on
from debias.train.rundir import CHECKPOINT
from debias.train.state import EMA, ema_decays


def train(cfg, out_dir, **kwargs):
    """The training loop on the config's own dataset."""
    return train_on(cfg, out_dir, load_dataset(cfg.data), **kwargs)

SMALL = {"model": {"model_channels": 32, "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": []},
         "data": {"max_images": 64},
         "train": {"steps": 60, "batch_size": 16, "log_every": 10, "checkpoint_every": 25, "warmup_steps": 4,
                   "snapshot_steps": [], "ema": "phema", "phema_std": [0.05, 0.10, 0.075], "phema_every": 5}}


def flat(weights: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in weights.values()])


@pytest.mark.parametrize("std", [0.01, 0.05, 0.10, 0.13, 0.2, 0.28])
def test_std_and_exponent_are_inverse(std):
    assert phema.exp_to_std(phema.std_to_exp(std)) == pytest.approx(std, rel=1e-12)


def test_profile_names_read_back_exactly():
    for std in (0.05, 0.0525, 0.1, 1 / 7):
        assert float(phema.profile_key(std).removeprefix("phema-")) == std
    assert phema.profile_key(0.0501) != phema.profile_key(0.0504)


def test_edm2s_profiles():
    assert phema.std_to_exp(0.05) == pytest.approx(16.97, abs=0.01)   # EDM2's two profiles
    assert phema.std_to_exp(0.10) == pytest.approx(6.94, abs=0.01)
    decay = phema.beta(0.10)
    gamma = phema.std_to_exp(0.10)
    assert decay(0) == 0.0  # the first update copies the weights
    assert decay(9) == pytest.approx((1 - 1 / 10) ** (gamma + 1))


@pytest.mark.parametrize("std", [0, -0.1, phema.PHEMA_STD_MAX, 0.3, True, "0.1"])
def test_a_bad_ema_length_is_one_line(std):
    with pytest.raises(DebiasError, match="EMA length"):
        phema.check_std(std)


def test_the_coefficients_of_a_stored_profile_pick_it_alone():
    steps, stds = [10, 10, 20, 20, 30, 30], [0.05, 0.10] * 3
    x = phema.coefficients(steps, stds, 20, 0.10)
    np.testing.assert_allclose(x, [0, 0, 0, 1, 0, 0], atol=1e-9)
    assert phema.coefficients(steps, stds, 27, 0.13).sum() == pytest.approx(1.0)


def test_a_reconstructed_profile_matches_the_directly_tracked_one():
    """The tracker of training (train.state.EMA with the phema decays) on a long random-walk trajectory:
    σ_rel 0.075 rebuilt from 40 snapshots of 0.05 and 0.10 is within 1e-4 of the distance between the
    profiles from 0.075 tracked directly (measured 4e-5)."""
    torch.manual_seed(0)
    model = nn.Linear(20, 10)
    ema = EMA(model, ema_decays("phema", [], False, [0.05, 0.10, 0.075]))
    snaps = []
    for k in range(2000):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p) + 0.001 * torch.sin(torch.full_like(p, k / 300)))
        ema.update(k)
        if (k + 1) % 50 == 0:
            states = ema.state_dicts(model)
            snaps.append((k + 1, [flat(states["phema-0.05"]), flat(states["phema-0.1"])]))  # copies
    x = phema.coefficients([s for s, _ in snaps for _ in range(2)], [0.05, 0.10] * len(snaps), 2000, 0.075)
    rebuilt = sum(x[2 * i + j] * profiles[j] for i, (_, profiles) in enumerate(snaps) for j in range(2))
    final = ema.state_dicts(model)
    direct, a, b = (flat(final[k]) for k in ("phema-0.075", "phema-0.05", "phema-0.1"))
    assert (rebuilt - direct).norm() <= 1e-4 * (a - b).norm()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("phema") / "run"
    train(config_from_dict(SMALL), out, progress=False)
    return out


def test_training_writes_the_profiles_every_phema_every_steps(run):
    assert [s for s, _ in snapshot_files(run)] == list(range(5, 61, 5))
    snap = load_checkpoint(run / "phema" / "phema-0000060.pt")
    assert list(snap.ema) == ["phema-0.05", "phema-0.1", "phema-0.075"] and snap.step == 60
    final = load_checkpoint(run / CHECKPOINT)
    assert all(torch.equal(snap.ema[k][n], final.ema[k][n]) for k in final.ema for n in final.ema[k])


def test_a_profile_rebuilt_after_training_matches_the_tracked_one(run):
    """Real training (60 steps, snapshots every 5): σ_rel 0.075 rebuilt from the 0.05 and 0.10 profiles is
    within 1 % of the distance between 0.075 and 0.05 from the directly tracked 0.075 (measured 0.2 %)."""
    final = load_checkpoint(run / CHECKPOINT)
    rebuilt = reconstruct(run, 0.075, using=[0.05, 0.10])
    direct, other = flat(final.ema["phema-0.075"]), flat(final.ema["phema-0.05"])
    assert (flat(rebuilt.ema["phema-0.075"]) - direct).norm() <= 0.01 * (direct - other).norm()
    assert rebuilt.step == 60 and rebuilt.extra["phema"]["snapshots"] == list(range(5, 61, 5))


def test_debias_phema_writes_a_model_that_samples(run, tmp_path):
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(app, ["phema", str(run), "--std", "0.13", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "σ_rel=0.13 at step 60 from 12 snapshots of 3 profiles" in result.output
    assert list(load_checkpoint(out).ema) == ["phema-0.13"]
    early = tmp_path / "early.pt"
    assert CliRunner().invoke(app, ["phema", str(run / "phema"), "--std", "0.13", "--step", "30", "--out",
                                    str(early)]).exit_code == 0
    assert load_checkpoint(early).extra["phema"]["snapshots"] == [5, 10, 15, 20, 25, 30]
    samples = tmp_path / "x.npz"
    result = CliRunner().invoke(app, ["sample", str(out), "--solver", "ddim", "--steps", "2", "--num-samples", "2",
                                      "--out", str(samples), "--device", "cpu"])
    assert result.exit_code == 0 and samples.exists(), result.output


def test_sample_ema_std_rebuilds_the_ema_beside_the_checkpoint(run, tmp_path):
    """`debias sample CKPT --ema-std S` (sample.ema_std) samples what `debias phema` of the phema/ folder beside
    CKPT gives; a value out of range is one line."""
    rebuilt = tmp_path / "rebuilt.pt"
    assert CliRunner().invoke(app, ["phema", str(run), "--std", "0.13", "--out", str(rebuilt)]).exit_code == 0
    common = ["--solver", "ddim", "--steps", "2", "--num-samples", "3", "--device", "cpu"]
    outs = []
    for source, extra in ((rebuilt, []), (run / CHECKPOINT, ["--ema-std", "0.13"]), (run / CHECKPOINT, [])):
        outs.append(tmp_path / f"x{len(outs)}.npz")
        result = CliRunner().invoke(app, ["sample", str(source), *common, *extra, "--out", str(outs[-1])])
        assert result.exit_code == 0, result.output
    images = [np.load(path)["images"] for path in outs]
    assert np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    result = CliRunner().invoke(app, ["sample", str(run / CHECKPOINT), *common, "--ema-std", "0.5", "--out",
                                      str(tmp_path / "bad.npz")])
    assert result.exit_code != 0 and "sample.ema_std" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args,message", [
    (["--std", "0.3"], "EMA length σ_rel must be a number in (0, 0.2887)"),
    (["--std", "0.1", "--step", "3"], "no post-hoc EMA snapshot at or before step 3"),
    (["--std", "0.1", "--step", "99"], "step 99 is beyond the last post-hoc EMA snapshot (60)"),
    (["--std", "0.1", "--using", "0.2"], "has no profile phema-0.2"),
    (["--std", "0.1", "--using", "a,b"], "--using must be σ_rel values"),
])
def test_debias_phema_bad_input_is_one_line(run, tmp_path, args, message):
    result = CliRunner().invoke(app, ["phema", str(run), *args, "--out", str(tmp_path / "m.pt")])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("where,message", [(".", "no post-hoc EMA snapshots"), ("absent", "absent: not found")])
def test_a_folder_without_profiles_is_one_line(tmp_path, where, message):
    result = CliRunner().invoke(app, ["phema", str(tmp_path / where), "--std", "0.1", "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_kill_and_resume_keeps_the_profiles_bitwise(run, tmp_path):
    cfg = config_from_dict(SMALL)
    train(cfg, tmp_path, progress=False, stop_after=37)  # killed after the checkpoint at 25
    assert load_checkpoint(tmp_path / CHECKPOINT).step == 25
    train(cfg, tmp_path, progress=False)
    for (step, ours), (_, reference) in zip(snapshot_files(tmp_path), snapshot_files(run), strict=True):
        a, b = load_checkpoint(ours), load_checkpoint(reference)
        assert all(torch.equal(a.ema[k][n], b.ema[k][n]) for k in b.ema for n in b.ema[k]), step


@pytest.mark.parametrize("override,key", [("train.phema_std=[0.3]", "train.phema_std"),
                                          ("train.phema_std=[0.1,0.1]", "train.phema_std"),
                                          ("train.phema_every=0", "train.phema_every"),
                                          ("train.ema=power", "train.ema"),
                                          ("sample.ema_std=0.5", "sample.ema_std")])
def test_bad_phema_params_are_one_line(override, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict({}, [override])
