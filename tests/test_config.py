"""Config loading: defaults, overrides, and one-line errors (exit code 2 from the CLI)."""

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
    (["eval.kid_subset_size=1000", "sample.num_samples=10"], "eval.kid_subset_size: must be <="),
    (["train.lr=.nan"], "train.lr: must be finite"),
    (["novalue"], "expected key=value"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


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
