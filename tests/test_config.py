"""Config loading: defaults, overrides, and one-line errors (exit code 2 from the CLI)."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from debias.cli import app
from debias.config import Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_file_is_valid_and_complete():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = config_from_dict(raw)
    assert cfg.weighting == "debias" and cfg.target == "eps"
    # every key of every section is spelled out in params.yaml
    assert set(raw) == set(Config().to_dict())
    for section, values in Config().to_dict().items():
        if isinstance(values, dict):
            assert set(raw[section]) == set(values), section


def test_params_file_values_are_the_defaults():
    """One source per default: the dataclass defaults (which the CLI uses) are params.yaml's values."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert config_from_dict(raw) == Config()


def test_overrides_use_dvc_syntax():
    cfg = config_from_dict({}, ["weighting=p2", "loss.p2_gamma=0.5", "sample.steps=[5, 10]", "train.lr=1e-3",
                                "data.path=null"])
    assert (cfg.weighting, cfg.loss.p2_gamma, cfg.sample.steps, cfg.train.lr) == ("p2", 0.5, [5, 10], 1e-3)
    assert config_from_dict({}, ["sample.steps=10"]).sample.steps == [10]


@pytest.mark.parametrize("overrides,message", [
    (["weighting=foo"], "weighting: unknown value 'foo'; allowed: constant, p2"),
    (["target=score"], "target: unknown value 'score'; allowed: eps, x0, v"),
    (["train.steps=-3"], "train.steps: must be >= 1"),
    (["train.steps=1.5"], "train.steps: must be an integer"),
    (["train.lr=fast"], "train.lr: must be a number"),
    (["model.learn_sigma=3"], "model.learn_sigma: must be true or false"),
    (["model.channel_mult=[1, x]"], "model.channel_mult[1]: must be an integer"),
    (["train.bogus=1"], "train.bogus: unknown key"),
    (["nonsense=1"], "nonsense: unknown key"),
    (["data=3"], "data: must be a mapping"),
    (["sample.solvers=[ddim, euler]"], "sample.solvers: unknown value 'euler'"),
    (["sample.precision=fp8"], "sample.precision: unknown value 'fp8'; allowed: fp32, bf16, fp16"),
    (["diffusion.steps=10"], "diffusion.steps: must be >= 20 for the linear schedule"),
    (["data.name=folder"], "data.path: is required"),
    (["train.snapshot_steps=[0]"], "train.snapshot_steps: must be positive"),
    (["eval.kid_subset_size=1000", "sample.num_samples=10"], "eval.kid_subset_size: KID subset size 1000 is larger"),
    (["train.lr=.nan"], "train.lr: must be finite"),
    (["novalue"], "expected key=value"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, overrides, pipeline=True)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_set_sizes_are_checked_for_the_pipeline_only():
    """A command that trains or samples scores nothing: 32 images pass for it, while the pipeline (its stages,
    `debias config`) refuses the KID subset of 100 that evaluate@ would refuse."""
    assert config_from_dict({}, ["data.max_images=32"]).data.max_images == 32
    with pytest.raises(ConfigError, match="eval.kid_subset_size: KID subset size 100 is larger"):
        config_from_dict({}, ["data.max_images=32"], pipeline=True)


FOLDER_64 = ["data.name=folder", "data.path=images", "data.image_size=64", "data.channels=3"]


@pytest.mark.parametrize("overrides,message", [
    (["data.image_size=33"], "data.image_size: image size 33 cannot be halved 1 times (model.channel_mult has 2 levels)"),
    (FOLDER_64, "model.attention_resolutions: attention resolution 4 never occurs in this UNet (its feature maps are "
                "[64, 32])"),
    (["model.attention_resolutions=[3]"], "model.attention_resolutions: attention resolution 3 never occurs"),
    (["model.num_head_channels=24"], "model.num_head_channels: 64 channels do not split into heads of 24"),
    (["model.attention_resolutions=[8]", "model.channel_mult=[1, 3]", "model.num_head_channels=64"],
     "model.num_head_channels: 32 channels do not split into heads of 64"),  # the attended first level
    (["sample.steps=[20, 1001]"], "sample.steps: ddim on the trailing spacing: cannot sample with 1001 steps: the "
                                  "model's diffusion chain has 1000 steps (choose 1..1000)"),  # ddpm's grid takes it
    (["sample.steps=1000"], "sample.steps: dpmsolver++ on the linspace spacing: 'linspace' spacing repeats timesteps "
                            "for 1000 steps of a 1000-step chain"),
    (["sample.spacing=ddim", "sample.steps=600"], "sample.steps: ddpm on the ddim spacing: 'ddim' spacing has no "
                                                  "integer stride giving exactly 600 of 1000 steps"),
    (["sample.solvers=[ddim]", "sample.steps=1000", "sample.denoise_to_zero=false"],
     "sample.steps: ddim on the trailing spacing: cannot sample with 1001 steps"),  # one point more: the last level
    (["sample.solvers=[ddim]", "sample.preset=upstream", "diffusion.schedule=cosine", "diffusion.steps=10",
      "sample.steps=10"],
     "analyze.color_steps: ddim on the even spacing: cannot sample with 20 steps"),
    (["analyze.fid_steps=1001"], "analyze.fid_steps: ddim on the trailing spacing: cannot sample with 1001 steps"),
    (["sample.num_samples=1"], "sample.num_samples: FID needs at least 2 images per set"),
    (["data.max_images=1"], "data.max_images: FID needs at least 2 images per set (sample.num_samples=128, "
                            "data.max_images=1)"),
    (["eval.reference_images=50"], "eval.kid_subset_size: KID subset size 100 is larger than the image sets "
                                   "(sample.num_samples=128, eval.reference_images=50); lower the KID subset size"),
    (["eval.metrics=[pr]", "sample.num_samples=3"], "eval.pr_k: precision/recall k = 3 needs more than 3 images per "
                                                    "set (sample.num_samples=3, eval.reference_images=400); lower k"),
    (["sample.ema_std=0.1"], "sample.ema_std: needs train.ema: phema"),
])
def test_cli_config_refuses_what_a_later_stage_would(overrides, message):
    """`debias config` (and so every stage, which loads the params the same way) refuses at load time what the
    UNet, the solvers' grids or the metrics would refuse after hours of work: one line, exit code 2."""
    result = CliRunner().invoke(app, ["config", "-p", str(REPO / "params.yaml"), *[f"-S{o}" for o in overrides]])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: {result.stderr.splitlines()[0][7:]}"]
    assert message in result.stderr


@pytest.mark.parametrize("overrides", [["sample.steps=999"], ["sample.solvers=[ddim]", "sample.steps=1000"],
                                       ["sample.preset=upstream", "sample.steps=1000"],
                                       ["eval.reference=ref.npz", "data.max_images=1", "eval.reference_images=null"],
                                       ["eval.metrics=[fid]", "sample.num_samples=2", "data.max_images=2"],
                                       ["train.ema=phema", "sample.ema_std=0.1"]])
def test_what_the_later_stages_take_is_accepted(overrides):
    config_from_dict({}, overrides)


def test_the_checks_across_sections_run_when_params_are_loaded_not_on_replace():
    """A command's flags replace a section (`debias sample -n 6`): the code that uses them checks them, not the
    params' other sections (a KID subset of 100 is the evaluate stage's business, not `debias sample`'s)."""
    cfg = config_from_dict({})
    assert dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, num_samples=6)).sample.num_samples == 6


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("args", [["config", "-S", "train.steps=abc"], ["config", "-p", "missing.yaml"],
                                  ["config", "-S", "weighting=nope"]])
def test_cli_config_errors_are_one_line_exit_2(args, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in result.output


def test_cli_config_prints_resolved_yaml():
    result = CliRunner().invoke(app, ["config", "-p", str(REPO / "params.yaml"), "-S", "weighting=min_snr"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["weighting"] == "min_snr"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_configs_are_complete_valid_params_files(path):
    """configs/paper/*.yaml are whole params files (usable as params.yaml) with the paper's recipe."""
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == set(Config().to_dict())
    cfg = config_from_dict(raw)
    assert (cfg.model.model_channels, cfg.model.num_res_blocks, cfg.model.attention_resolutions) == (128, 1, [16])
    assert (cfg.model.num_head_channels, cfg.model.learn_sigma, cfg.diffusion.schedule) == (64, True, "linear")
    assert (cfg.train.lr, cfg.train.steps, cfg.train.ema_rates, cfg.sample.preset) == (2e-5, 500_000, [0.9999], "upstream")
    assert cfg.data.name == "folder" and cfg.data.class_cond == (path.stem == "cifar10")
