"""Config fuzzing: mutated params.yaml files and random `--set` overrides never give a traceback.

`debias config` and `debias train` either accept the configuration or print exactly one line
"error: ..." on stderr and exit with code 2. Mutations start from the real params.yaml: a leaf
replaced by a value of another type, a key deleted, an unknown key added, numbers set to
-1/0/1e12/nan/inf, lists emptied or nested. (`debias train` is stubbed after validation so that a
valid mutation does not start a real run.)
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import debias.train.loop as loop
from debias.cli import app
from debias.config import ConfigError, config_from_dict, load_config
from debias.models.factory import unet_kwargs_for

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
PARAMS = yaml.safe_load(PARAMS_FILE.read_text())
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def leaves(node, path=()) -> list[tuple]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in leaves(v, (*path, k))] or [path]
    return [path]


LEAVES = leaves(PARAMS)
SECTIONS = [()] + [(k,) for k, v in PARAMS.items() if isinstance(v, dict)]
SPECIAL_NUMBERS = [-1, 0, 1, 1e12, -1e12, 10**30, float("nan"), float("inf"), -float("inf"), 0.5, -0.0]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                    st.text(max_size=12), st.sampled_from(SPECIAL_NUMBERS))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=6), scalars, max_size=3),
                   st.sampled_from([[], {}, [[1]], [{"a": 1}], "", "-1", "1e12", ".nan", "yes", "null"]))
names = st.one_of(st.text(min_size=1, max_size=12), st.sampled_from(["bogus", "Steps", "train ", "data.x", "1", ""]))


@st.composite
def mutation(draw):
    kind = draw(st.sampled_from(["replace", "delete", "add", "number", "empty", "nest"]))
    if kind == "add":
        return kind, draw(st.sampled_from(SECTIONS)), (draw(names), draw(values))
    return kind, draw(st.sampled_from(LEAVES)), draw(values if kind == "replace" else st.sampled_from(SPECIAL_NUMBERS))


def mutate(params: dict, mutations) -> dict:
    raw = copy.deepcopy(params)
    for kind, path, value in mutations:
        parent = raw
        for key in path[:-1] if kind != "add" else path:
            if not isinstance(parent, dict) or key not in parent:
                break
            parent = parent[key]
        else:
            if not isinstance(parent, dict):
                continue
            if kind == "add":
                name, val = value
                parent[name] = val
            elif path[-1] not in parent:
                continue
            elif kind == "delete":
                del parent[path[-1]]
            elif kind == "replace":
                parent[path[-1]] = value
            elif kind == "number":
                old = parent[path[-1]]
                parent[path[-1]] = [value] if isinstance(old, list) else value
            elif kind == "empty":
                parent[path[-1]] = [] if isinstance(parent[path[-1]], list) else None
            else:
                parent[path[-1]] = [parent[path[-1]]]
    return raw


def assert_clean(result, args) -> None:
    """Accepted (exit 0), or exactly one line "error: ..." on stderr and exit code 2 — never a traceback."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback
        raise AssertionError(f"{args}: traceback\n{''.join(traceback.format_exception(result.exception))}")
    if result.exit_code == 0:
        return
    assert result.exit_code == 2, (args, result.output)
    lines = result.stderr.split("\n")
    assert lines[-1] == "" and len(lines) == 2, (args, result.stderr)
    assert lines[0].startswith("error: "), (args, result.stderr)
    assert not any(ch in lines[0] for ch in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), (args, result.stderr)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


@pytest.fixture
def stub_train(monkeypatch, workdir):
    """`debias train` with everything after validation (and the model-shape check) stubbed out."""
    calls = []

    def fake_train(cfg, out, dataset, **kwargs):
        unet_kwargs_for(cfg, 10 if cfg.data.class_cond else None)
        calls.append(cfg)
        return loop.TrainResult(checkpoint=Path(out) / "checkpoint.pt", step=0, start_step=0, loss=None,
                                    seconds=0.0)

    monkeypatch.setattr(loop, "train", fake_train)
    return calls


def write_params(workdir: Path, raw) -> Path:
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


@FUZZ
@given(st.lists(mutation(), min_size=1, max_size=3))
def test_mutated_params_never_traceback(workdir, mutations):
    raw = mutate(PARAMS, mutations)
    path = write_params(workdir, raw)
    args = ["config", "-p", str(path)]
    assert_clean(CliRunner().invoke(app, args), (args, mutations))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(mutation(), min_size=1, max_size=3))
def test_mutated_params_never_traceback_in_train(workdir, stub_train, mutations):
    path = write_params(workdir, mutate(PARAMS, mutations))
    args = ["train", "-p", str(path), "--out", str(workdir / "run"), "--no-progress"]
    assert_clean(CliRunner().invoke(app, args), (args, mutations))


def override_text(value) -> str:
    """A value as `-S` would carry it: YAML flow style for structures, plain text otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


dotted = st.one_of(st.sampled_from([".".join(p) for p in LEAVES]), st.sampled_from(["train", "data", "loss"]),
                   names, st.builds(lambda s, n: f"{s}.{n}", st.sampled_from(list(PARAMS)), names))
overrides = st.one_of(st.builds(lambda k, v: f"{k}={override_text(v)}", dotted, values),
                      st.builds(lambda k, t: f"{k}={t}", dotted, st.text(max_size=15)),
                      st.text(max_size=20))


@FUZZ
@given(st.lists(overrides, min_size=1, max_size=3))
def test_random_set_options_never_traceback(sets):
    args = ["config", "-p", str(PARAMS_FILE), *[f"--set={s}" for s in sets]]
    assert_clean(CliRunner().invoke(app, args), args)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(overrides, min_size=1, max_size=3))
def test_random_set_options_never_traceback_in_train(workdir, stub_train, sets):
    args = ["train", "-p", str(PARAMS_FILE), "--out", str(workdir / "run"), "--no-progress",
            *[f"--set={s}" for s in sets]]
    assert_clean(CliRunner().invoke(app, args), args)


@pytest.mark.parametrize("text", [
    "- a list\n- not a mapping\n", "just a string\n", "42\n", "train: [1, 2]\n", "train:\n  steps: [[[[1]]]]\n",
    "data: null\n", "? [a, b]\n: 1\n", "a: &a [1, 1, 1]\nb: &b [*a, *a, *a]\nmodel: {channel_mult: [*b, *b]}\n",
    "train: {steps: 2000-01-01}\n", "seed: !!python/object/apply:os.system ['true']\n", "\tbad: indent\n",
    "[" * 5000 + "]" * 5000 + "\n", "train: {lr: 1e-3, steps: 1e3}\n", "weighting: debias\nweighting: p2\n",
    "sample: {solvers: [ddim, 7, null]}\n", "data: {name: folder}\n", "\x00\x01\x02", "model: {channel_mult: [1, 2, 3, 4, 5, 6]}\n",
])
def test_hostile_params_files(workdir, text, stub_train):
    path = workdir / "hostile.yaml"
    path.write_text(text, errors="surrogateescape")
    for command in ("config", "train"):
        args = [command, "-p", str(path), *(["--out", str(workdir / "run")] if command == "train" else [])]
        assert_clean(CliRunner().invoke(app, args), args)


@pytest.mark.parametrize("override", ["data.na\nme=1", "data.name=\"a\\nb\"", "x\u2028y=2", "train.steps",
                                      "train.steps.x=1", "=1", "data.path=" + "[" * 3000 + "]" * 3000])
def test_hostile_set_options(override):
    """Line breaks in keys or values, a missing '=', a leaf used as a section, deep nesting: one line."""
    result = CliRunner().invoke(app, ["config", "-p", str(PARAMS_FILE), f"--set={override}"])
    assert_clean(result, override)
    assert result.exit_code == 2


def test_params_file_that_is_a_folder_or_binary(workdir):
    (workdir / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    for path in (workdir, workdir / "binary.yaml", workdir / "missing.yaml"):
        result = CliRunner().invoke(app, ["config", "-p", str(path)])
        assert_clean(result, path)
        assert result.exit_code == 2


def test_the_real_params_file_is_valid():
    cfg = load_config(PARAMS_FILE)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError):
        config_from_dict(PARAMS, ["train.steps=-1"])


@pytest.mark.parametrize("override,words", [
    ("model.num_head_channels=24", "do not split into heads"), ("model.attention_resolutions=[3]", "never occurs"),
    ("data.image_size=1048576", "data.image_size"), ("model.model_channels=1048576", "model.model_channels"),
    ("model.num_res_blocks=100000000", "model.num_res_blocks"), ("model.channel_mult=[1,2,1000000]", "channel_mult"),
    ("train.batch_size=1000000000000", "train.batch_size"), ("data.image_size=9", "cannot be halved"),
])
def test_real_train_fails_at_once_on_unbuildable_or_absurd_models(workdir, override, words):
    """Not stubbed: values that pass type checks but cannot build (or would exhaust memory or time)
    are refused before any training."""
    args = ["train", "-p", str(PARAMS_FILE), "--out", str(workdir / "real"), "--no-progress", f"--set={override}"]
    result = CliRunner().invoke(app, args)
    assert_clean(result, args)
    assert result.exit_code == 2 and words in result.stderr
    assert not (workdir / "real" / "checkpoint.pt").exists()
