"""`debias fid`, `debias convert`, `debias analyze`, `debias compare` through Typer's CliRunner."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from debias.analysis import channel_means, color_shift, evaluation_timesteps, x0_bias_per_timestep
from debias.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from debias.config import Config
from debias.convert import unet_kwargs_from_flags
from debias.diffusion.schedule import Schedule
from debias.models.factory import DiffusionModel, model_from_checkpoint
from debias.models.unet import UNetModel

runner = CliRunner()

FLAGS = ("--attention_resolutions 4 --class_cond False --diffusion_steps 50 --dropout 0.0 --image_size 8 "
         "--learn_sigma True --noise_schedule cosine --num_channels 32 --num_head_channels 16 --num_res_blocks 1 "
         "--resblock_updown True --use_fp16 False --use_scale_shift_norm True --channel_mult 1,2 --predict_xstart True")


def cli(*args):
    from debias.cli import app

    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


@pytest.fixture(scope="module")
def original_state_dict(tmp_path_factory):
    """A state dict as the original code saves it, from a model built with guided-diffusion flags."""
    from debias.convert import parse_flags

    torch.manual_seed(0)
    model = UNetModel(**unet_kwargs_from_flags(parse_flags(FLAGS)))
    for p in model.parameters():  # zero-initialised layers get values so every weight matters
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("original") / "ema_0.9999_000100.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_convert_round_trips_to_identical_outputs(original_state_dict, tmp_path):
    path, original = original_state_dict
    out = tmp_path / "model.pt"
    result = cli("convert", path, "--flags", FLAGS, "--out", out)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    assert ckpt.config["target"] == "x0" and ckpt.config["diffusion"] == {"steps": 50, "schedule": "cosine"}
    model = model_from_checkpoint(ckpt)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 10, 49])
    with torch.no_grad():
        assert torch.equal(model(x, t), original.eval()(x, t))
    sampled = cli("sample", out, "--solver", "ddim", "--steps", 3, "-n", 4, "--out", tmp_path / "s.npz")
    assert sampled.exit_code == 0, sampled.output


def test_convert_errors(original_state_dict, tmp_path):
    path, _ = original_state_dict
    assert_one_line_error(cli("convert", tmp_path / "missing.pt", "--flags", FLAGS, "-o", tmp_path / "m.pt"))
    wrong = FLAGS.replace("--num_channels 32", "--num_channels 64")
    assert_one_line_error(cli("convert", path, "--flags", wrong, "-o", tmp_path / "m.pt"))
    assert_one_line_error(cli("convert", path, "--flags", FLAGS + " --predict_xstart Ture", "-o", tmp_path / "m.pt"))
    assert not (tmp_path / "m.pt").exists()


def test_fid_between_npz_and_builtin_dataset(tmp_path):
    digits = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (20, 1, 8, 8), dtype=np.uint8))
    np.savez(tmp_path / "gen.npz", images=digits.numpy())
    result = cli("fid", tmp_path / "gen.npz", "digits", "-m", "fid", "-m", "kid", "--kid-subset-size", 10,
                 "--max-images", 24, "--out", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["fid"] > 0 and saved["provenance"]["n_reference"] == 24 and saved["provenance"]["n_generated"] == 20


def test_fid_errors(tmp_path):
    np.savez(tmp_path / "gen.npz", images=np.zeros((5, 1, 8, 8), np.uint8))
    assert_one_line_error(cli("fid", tmp_path / "gen.npz", "nowhere"))
    assert_one_line_error(cli("fid", tmp_path / "gen.npz", "digits", "-m", "kid", "--kid-subset-size", 100))


class ExactGaussianDenoiser(torch.nn.Module):
    """The exact E[x0 | x_t] for data x0 ~ N(mu, s²) per pixel, as an eps-prediction network,
    optionally with a deliberate per-channel offset on the implied x0."""

    def __init__(self, schedule, mu, s, offset=None):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s
        self.offset = offset

    def forward(self, xt, t, y=None):
        a = self.schedule.gather(self.schedule.alpha, t, xt)
        sg = self.schedule.gather(self.schedule.sigma, t, xt)
        x0 = self.mu + a * self.s ** 2 / (a ** 2 * self.s ** 2 + sg ** 2) * (xt - a * self.mu)
        if self.offset is not None:
            x0 = x0 + self.offset.view(1, -1, 1, 1)
        return (xt - a * x0) / sg


def test_exact_denoiser_has_no_bias_and_a_biased_one_is_detected():
    schedule = Schedule.named("linear", 1000)
    gen = torch.Generator().manual_seed(0)
    mu, s = 0.1, 0.3
    images = mu + s * torch.randn(512, 3, 8, 8, generator=gen, dtype=torch.float64)
    ts = evaluation_timesteps(1000, 6)
    exact = x0_bias_per_timestep(DiffusionModel(ExactGaussianDenoiser(schedule, mu, s), schedule, "eps", False,
                                                (3, 8, 8)), images, ts)
    for row in exact:  # the exact posterior mean is unbiased: |mean error| ≲ its standard error
        assert max(abs(b) for b in row.bias) < 4 * (row.mse / images[:, 0].numel()) ** 0.5 + 1e-9
    offset = torch.tensor([0.2, -0.1, 0.0], dtype=torch.float64)
    biased = x0_bias_per_timestep(DiffusionModel(ExactGaussianDenoiser(schedule, mu, s, offset), schedule, "eps",
                                                 False, (3, 8, 8)), images, ts)
    for row in biased:
        assert row.bias[0] > 0.15 and row.bias[1] < -0.05 and abs(row.bias[2]) < 0.05


def test_color_shift_signs():
    data_mean = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    bright = torch.full((4, 3, 2, 2), 200, dtype=torch.uint8)
    bright[:, 2] = 50
    rows = color_shift({10: bright}, data_mean)
    assert rows[0].shift[0] > 0.2 and rows[0].shift[2] < -0.2
    torch.testing.assert_close(channel_means(bright), torch.tensor([200 / 255, 200 / 255, 50 / 255], dtype=torch.float64))


def _tiny_checkpoint(path):
    cfg = Config().to_dict()
    cfg["diffusion"] = {"steps": 50, "schedule": "linear"}
    kwargs = dict(image_size=8, in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1,
                  attention_resolutions=(), channel_mult=(1,), num_head_channels=16)
    torch.manual_seed(0)
    save_checkpoint(path, Checkpoint(config=cfg, unet_kwargs=kwargs, model=UNetModel(**kwargs).state_dict()))


def test_analyze_command_writes_tables_and_figures(tmp_path):
    _tiny_checkpoint(tmp_path / "m.pt")
    result = cli("analyze", tmp_path / "m.pt", "--data", "digits", "--out-dir", tmp_path / "a", "--num-images", 16,
                 "--timesteps", 3, "--steps", 2, "--steps", 3, "--num-samples", 4)
    assert result.exit_code == 0, result.output
    for name in ("x0_bias.tsv", "x0_bias.png", "color_shift.tsv", "color_shift.png", "color_grid.png"):
        assert (tmp_path / "a" / name).is_file()
    assert_one_line_error(cli("analyze", tmp_path / "nope.pt"))


def exp_record(name, rev, fid, kid=0.01, **params):
    """One run as `dvc exp show --json` lists it: params.yaml and metrics/ddim.json."""
    return {"name": name, "rev": rev, "data": {"rev": rev, "params": {"params.yaml": {"data": {
        "weighting": "debias", "target": "eps", "seed": 0, "sample": {"seed": 0, "steps": [20]}, **params}}},
        "metrics": {"metrics/ddim.json": {"data": {"ddim": {"fid": fid, "kid": kid, "seconds": 1.0 + fid}}}}}}


def test_compare_groups_seeds_into_recipes_with_intervals(tmp_path):
    """Fake experiments: runs that differ only in seed / sample.seed are one recipe (mean and Student-t
    interval over seeds), the workspace and its commit count once, a recipe with one seed has no interval,
    and the paired difference over shared seeds is reported; every score, figures with error bars."""
    from debias.seeds import t_quantile

    constant = [exp_record(f"constant-{s}", f"c{s}", fid, weighting="constant", seed=s)
                for s, fid in enumerate((30.0, 32.0, 31.0))]
    debias = [exp_record(f"debias-{s}", f"d{s}", fid, seed=s) for s, fid in enumerate((33.0, 34.0, 35.0))]
    lonely = exp_record("p2-0", "p0", 40.0, weighting="p2", sample={"seed": 7, "steps": [20]})
    workspace = {**debias[0], "rev": "workspace", "name": None, "data": {**debias[0]["data"], "rev": "workspace"}}
    table = [{**workspace, "experiments": None},
             {"rev": "d0", "name": "main", "data": debias[0]["data"],
              "experiments": [{"name": e["name"], "revs": [e]} for e in (*debias[1:], *constant, lonely)]}]
    (tmp_path / "exp.json").write_text(json.dumps(table))
    result = cli("compare", "--exp-json", tmp_path / "exp.json", "--out-dir", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    first = {row[0].lstrip("| "): row for row in rows[1:4]}
    assert set(first) == {"debias, eps", "weighting=constant", "weighting=p2"} or set(first) == {
        "weighting=debias", "weighting=constant", "weighting=p2"}, rows
    half = t_quantile(0.95, 2) * 1.0 / 3 ** 0.5  # FIDs 33, 34, 35 and 30, 32, 31: s = 1
    by_weighting = {row[1]: row for row in rows[1:4]}
    assert by_weighting["debias"][3] == "3" and by_weighting["debias"][4].startswith(f"34.0 [{34 - half:.1f}, ")
    assert by_weighting["constant"][4].startswith(f"31.0 [{31 - half:.1f}, ")
    assert by_weighting["p2"][3] == "1" and by_weighting["p2"][4].rstrip(" |") == "40.0"  # one seed: no interval
    assert "KID ddim" in md and "seconds" not in md
    assert "weighting=constant − " in md and "FID ddim: −3.0 [" in md and ", 3 seeds" in md  # 30−33, 32−34, 31−35
    assert "weighting=p2 − " in md and "no shared seeds" in md  # its only seed (0, 7) is not one of debias's
    assert (tmp_path / "cmp" / "comparison.png").is_file()
    (tmp_path / "empty.json").write_text("[]")
    assert_one_line_error(cli("compare", "--exp-json", tmp_path / "empty.json"))


def test_prune_removes_only_the_states_of_other_recipes(tmp_path, monkeypatch):
    from debias.config import config_from_dict
    from debias.train.rundir import run_key

    monkeypatch.chdir(tmp_path)  # no params.yaml here: the built-in defaults are the current params
    current, other = run_key(config_from_dict({})), run_key(config_from_dict({"weighting": "constant"}))
    assert current != other
    for name in (current, other, "p2-eps-00000000"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "checkpoint.pt").write_bytes(b"state")
    (tmp_path / "checkpoints" / "notes").mkdir()  # not a training state: never touched
    dry = cli("prune", "--dry-run", "--keep", "p2-eps-00000000")
    assert dry.exit_code == 0, dry.output
    assert f"would remove checkpoints/{other}" in dry.output and len(list((tmp_path / "checkpoints").iterdir())) == 4
    done = cli("prune")
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted([current, "notes"])
    assert_one_line_error(cli("prune", "--dir", tmp_path / "nowhere"))


def test_prune_finds_the_states_where_every_workspace_puts_them(tmp_path, monkeypatch):
    """Without --dir, prune looks where the train stage writes: $DEBIAS_STATES (from the project's root,
    DVC_ROOT under DVC), else checkpoints/ of the root."""
    for name in ("main/checkpoints/p2-eps-00000000", "scratch/constant-eps-00000000"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "checkpoint.pt").write_bytes(b"state")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "main"))
    assert f"would remove {tmp_path}/main/checkpoints/p2-eps-00000000" in cli("prune", "--dry-run").output
    monkeypatch.setenv("DEBIAS_STATES", "../scratch")
    assert f"would remove {tmp_path}/main/../scratch/constant-eps-00000000" in cli("prune", "--dry-run").output


def test_sweep_queues_every_combination_named_by_its_recipe(tmp_path, monkeypatch):
    """`debias sweep` expands -S grids as `dvc exp run --queue` does and names each experiment by its recipe and
    its other params; a bad value, an unknown key or another params file is one line before anything is queued."""
    from debias.config import config_from_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(json.dumps(config_from_dict({}).to_dict()))
    dry = cli("sweep", "--dry-run", "-S", "weighting=constant,p2", "-S", "target=x0", "-S", "train.steps=70,140")
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines() == [
        f"dvc exp run --queue -n {w}-x0-train.steps={n} -S weighting={w} -S target=x0 -S train.steps={n}"
        for w in ("constant", "p2") for n in (70, 140)]
    phema = cli("sweep", "--dry-run", "-S", "train.ema=phema", "-S", "sample.ema_std=0.05")
    assert phema.output.split()[5] == "debias-eps-train.ema=phema-sample.ema_std=0.05", phema.output
    for bad in (["weighting=nope,p2"], ["train.stepz=3"], ["other.yaml:x=1"], ["weighting=constant,"],
                ["sample.ema_std=0.05"]):  # the last: a combination the checks across sections refuse
        assert_one_line_error(cli("sweep", "--dry-run", *(a for o in bad for a in ("-S", o))))


def test_info_lists_every_registry_beyond_the_paper_included():
    result = cli("info")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split(None, 1)[1] for line in result.output.splitlines()}
    assert lines["weightings"].endswith("edm, learned")
    assert lines["timesteps"] == "uniform, lognormal, logistic, laplace, loss_second_moment"
    assert lines["emas"].startswith("traditional, phema")


def test_fid_reuses_the_prepare_stages_reference_features_while_they_hold(tmp_path, monkeypatch):
    """In a project whose prepare stage ran, `debias fid GENERATED` takes data/reference_features.npz when its
    Inception weights, reference settings and image shape are these (one note says so) and computes the reference
    as before otherwise (one note says why): the scores are the same either way."""
    import yaml

    from debias.config import config_from_dict
    from debias.jobs.prepare import prepare
    from debias.metrics.features import load_features, save_features

    overrides = ["eval.metrics=[fid, kid]", "eval.reference_images=8", "eval.kid_subset_size=4", "eval.batch_size=4",
                 "eval.device=cpu", "sample.num_samples=6", "data.max_images=20"]
    cfg = config_from_dict({}, overrides)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    features = tmp_path / "data" / "reference_features.npz"
    prepare(cfg, tmp_path / "data" / "prepared", features, ["stages/prepare.py"])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "gen.npz", images=rng.integers(0, 256, (6, 1, 8, 8), dtype=np.uint8))

    def fid(*args):
        result = cli("fid", "gen.npz", "--out", "scores.json", *args)
        assert result.exit_code == 0, result.output
        scores = json.loads((tmp_path / "scores.json").read_text())
        return ({k: v for k, v in scores.items() if k != "provenance"},
                [line for line in result.stderr.splitlines() if line.startswith("note:")])

    reused, notes = fid()
    assert notes == ["note: using the reference features of data/reference_features.npz (the same Inception weights "
                     "and reference settings)"]
    _, notes = fid("-S", "eval.reference_images=7")
    assert notes == ["note: computing the reference features: data/reference_features.npz was made with other "
                     "reference settings"]
    stored = load_features(features)
    save_features(features, stored.values, {**stored.meta, "weights_sha256": "0" * 64}, spatial=stored.spatial)
    computed, notes = fid()
    assert notes == ["note: computing the reference features: data/reference_features.npz was made with other "
                     "Inception weights"]
    assert computed == reused
