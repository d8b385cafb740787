"""Typed, validated configuration: one frozen dataclass per params.yaml section.

``load_config(path, overrides)`` reads params.yaml, applies ``key.sub=value`` overrides (the syntax
of ``dvc exp run -S``; values parsed as YAML), and validates everything once. The first problem is
raised as a :class:`ConfigError` whose message names the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from debias.diffusion.schedule import SCHEDULES
from debias.diffusion.targets import TARGETS
from debias.diffusion.weighting import WEIGHTINGS, WeightingParams
from debias.errors import DebiasError

SOLVERS = ("ddpm", "ddim", "dpmsolver", "dpmsolver++", "unipc")
SPACINGS = ("even", "linspace", "leading", "trailing")
# precision name -> autocast dtype (None: plain float32)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(AUTOCAST_DTYPES)
DEVICES = ("cpu", "cuda", "auto")
METRICS = ("fid", "kid", "pr")
DATASETS = ("digits", "folder", "twemoji")


class ConfigError(DebiasError):
    """A params.yaml / override problem, reported in one line."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: Any, allowed: typing.Iterable[str], key: str) -> None:
    allowed = tuple(allowed)
    _require(value in allowed, key, f"unknown value {value!r}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class DataConfig:
    """What to train on. ``name`` is a dataset of the registry in :mod:`debias.data`."""

    name: str = "digits"
    path: str | None = None          # image folder for ``name: folder``
    image_size: int = 8
    channels: int = 1                # 1 = grey, 3 = RGB
    class_cond: bool = False         # labels from the dataset (digits) or sub-folder names (folder)
    random_flip: bool = False
    on_error: str = "skip"           # a corrupt image in a folder: skip it (reported) or fail
    max_images: int | None = None    # use only the first N images (quick runs)

    def __post_init__(self):
        _one_of(self.name, DATASETS, "data.name")
        _require(4 <= self.image_size <= 4096, "data.image_size", "must be in [4, 4096]")
        _require(self.channels in (1, 3), "data.channels", f"must be 1 or 3, got {self.channels}")
        _one_of(self.on_error, ("skip", "fail"), "data.on_error")
        _require(self.max_images is None or self.max_images >= 1, "data.max_images", "must be >= 1 or null")
        _require(self.name != "folder" or bool(self.path), "data.path", "is required when data.name is 'folder'")


@dataclass(frozen=True)
class ModelConfig:
    """The ADM UNet (attention given as resolutions, e.g. [16] = attention at 16×16)."""

    model_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=lambda: [4])
    num_head_channels: int = 16
    dropout: float = 0.0
    learn_sigma: bool = True
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_checkpoint: bool = False
    use_new_attention_order: bool = False

    def __post_init__(self):
        _require(1 <= self.model_channels <= 4096, "model.model_channels", "must be in [1, 4096]")
        _require(self.model_channels % 32 == 0, "model.model_channels", "must be a multiple of 32 (GroupNorm uses 32 groups)")
        _require(1 <= len(self.channel_mult) <= 12 and all(1 <= m <= 64 for m in self.channel_mult),
                 "model.channel_mult", "must be a list of 1 to 12 integers in [1, 64]")
        _require(1 <= self.num_res_blocks <= 64, "model.num_res_blocks", "must be in [1, 64]")
        _require(all(r >= 1 for r in self.attention_resolutions), "model.attention_resolutions", "must be positive")
        _require(self.num_head_channels >= 1, "model.num_head_channels", "must be >= 1")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process."""

    steps: int = 1000
    schedule: str = "linear"

    def __post_init__(self):
        _require(2 <= self.steps <= 100_000, "diffusion.steps", "must be in [2, 100000]")
        _one_of(self.schedule, SCHEDULES, "diffusion.schedule")
        _require(self.schedule != "linear" or self.steps >= 20, "diffusion.steps", "must be >= 20 for the linear schedule")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0           # max global grad norm; 0 disables clipping
    ema_rates: list[float] = field(default_factory=lambda: [0.999])
    ema_warmup: bool = True          # rate_k = min(rate, (1 + k)/(10 + k)) so short runs get a useful EMA
    precision: str = "fp32"
    checkpoint_every: int = 500
    snapshot_steps: list[int] = field(default_factory=list)
    log_every: int = 50
    devices: str = "cpu"
    num_workers: int = 0
    compile: bool = False

    def __post_init__(self):
        _require(self.steps >= 1, "train.steps", "must be >= 1")
        _require(1 <= self.batch_size <= 1_000_000, "train.batch_size", "must be in [1, 1000000]")
        _require(0 < self.lr < 1, "train.lr", "must be in (0, 1)")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _require(len(self.ema_rates) >= 1 and all(0 <= r < 1 for r in self.ema_rates), "train.ema_rates",
                 "must be a non-empty list of rates in [0, 1)")
        _one_of(self.precision, PRECISIONS, "train.precision")
        _require(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _require(all(1 <= s <= self.steps for s in self.snapshot_steps), "train.snapshot_steps",
                 f"must lie in [1, train.steps={self.steps}]")
        _require(self.log_every >= 1, "train.log_every", "must be >= 1")
        _one_of(self.devices, DEVICES, "train.devices")
        _require(self.num_workers >= 0, "train.num_workers", "must be >= 0")


@dataclass(frozen=True)
class SampleConfig:
    """Sampling: the pipeline runs every solver in ``solvers`` at every count in ``steps``."""

    solvers: list[str] = field(default_factory=lambda: ["ddpm", "ddim", "dpmsolver++", "unipc"])
    steps: list[int] = field(default_factory=lambda: [20])
    num_samples: int = 500
    batch_size: int = 250
    seed: int = 0
    clip_x0: bool = True
    spacing: str = "even"
    eta: float = 0.0                 # DDIM η
    order: int = 2                   # DPM-Solver / UniPC order
    unipc_variant: str = "bh2"       # UniPC B(h): bh1 or bh2
    ema: bool = True                 # sample the first EMA's weights
    precision: str = "fp32"          # fp32 (TF32 matmuls on CUDA) | bf16 | fp16 (CUDA): autocast
    compile: bool = False

    def __post_init__(self):
        _require(len(self.solvers) >= 1, "sample.solvers", "must name at least one solver")
        for solver in self.solvers:
            _one_of(solver, SOLVERS, "sample.solvers")
        _require(len(self.steps) >= 1 and all(1 <= s <= 10_000 for s in self.steps), "sample.steps",
                 "must be a non-empty list of step counts in [1, 10000]")
        _require(self.num_samples >= 1, "sample.num_samples", "must be >= 1")
        _require(self.batch_size >= 1, "sample.batch_size", "must be >= 1")
        _require(self.seed >= 0, "sample.seed", "must be >= 0")
        _one_of(self.spacing, SPACINGS, "sample.spacing")
        _require(self.eta >= 0, "sample.eta", "must be >= 0")
        _require(1 <= self.order <= 3, "sample.order", "must be 1, 2 or 3")
        _one_of(self.unipc_variant, ("bh1", "bh2"), "sample.unipc_variant")
        _one_of(self.precision, PRECISIONS, "sample.precision")


@dataclass(frozen=True)
class EvalConfig:
    """FID / KID / precision-recall."""

    metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "pr"])
    inception_weights: str | None = None
    reference_images: int | None = None   # FID reference: a fixed random subset of the training set (null = all)
    kid_subset_size: int = 100
    pr_k: int = 3
    batch_size: int = 64
    device: str = "cpu"

    def __post_init__(self):
        for metric in self.metrics:
            _one_of(metric, METRICS, "eval.metrics")
        _require(self.kid_subset_size >= 2, "eval.kid_subset_size", "must be >= 2")
        _require(self.pr_k >= 1, "eval.pr_k", "must be >= 1")
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _require(self.reference_images is None or self.reference_images >= 2, "eval.reference_images",
                 "must be >= 2 or null")
        _one_of(self.device, DEVICES, "eval.device")


@dataclass(frozen=True)
class AnalyzeConfig:
    """The paper's evidence: x0 bias per timestep and colour shift vs sampling steps."""

    num_images: int = 256
    timesteps: int = 20              # evaluated timesteps, evenly spread over the chain
    seed: int = 0
    color_solver: str = "ddim"
    color_steps: list[int] = field(default_factory=lambda: [2, 3, 5, 10, 20, 50])
    color_samples: int = 256
    fid_solver: str = "ddim"         # solver/steps used to score the training snapshots
    fid_steps: int = 20
    fid_samples: int = 64

    def __post_init__(self):
        _require(self.num_images >= 1, "analyze.num_images", "must be >= 1")
        _require(self.timesteps >= 1, "analyze.timesteps", "must be >= 1")
        _one_of(self.color_solver, SOLVERS, "analyze.color_solver")
        _one_of(self.fid_solver, SOLVERS, "analyze.fid_solver")
        _require(len(self.color_steps) >= 1 and all(s >= 1 for s in self.color_steps), "analyze.color_steps",
                 "must be a non-empty list of positive step counts")
        _require(self.color_samples >= 1, "analyze.color_samples", "must be >= 1")
        _require(self.fid_steps >= 1, "analyze.fid_steps", "must be >= 1")
        _require(self.fid_samples >= 2, "analyze.fid_samples", "must be >= 2")


@dataclass(frozen=True)
class Config:
    """Everything one experiment needs: one recipe (``weighting`` × ``target``) and its pipeline."""

    weighting: str = "debias"
    target: str = "eps"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: WeightingParams = field(default_factory=WeightingParams)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)

    def __post_init__(self):
        _one_of(self.weighting, WEIGHTINGS, "weighting")
        _one_of(self.target, TARGETS, "target")
        _require(self.seed >= 0, "seed", "must be >= 0")
        _require(self.loss.p2_k > 0, "loss.p2_k", "must be > 0")
        _require(self.loss.p2_gamma >= 0, "loss.p2_gamma", "must be >= 0")
        _require(self.loss.min_snr_gamma > 0, "loss.min_snr_gamma", "must be > 0")
        _require(self.loss.edm_sigma_data > 0, "loss.edm_sigma_data", "must be > 0")
        _require("kid" not in self.eval.metrics or self.eval.kid_subset_size <= self.sample.num_samples,
                 "eval.kid_subset_size", f"must be <= sample.num_samples={self.sample.num_samples} (KID draws subsets of the samples)")

    def to_dict(self) -> dict:
        """Plain nested dict (what params.yaml holds and checkpoints store)."""
        return dataclasses.asdict(self)


def _yaml11_float(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string; accept such exponent literals as numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, converting int→float and list→list of items."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (hint,) = [o for o in options if o is not type(None)]
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        _require(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return _build(hint, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # `-S sample.steps=10` means [10]
        _require(isinstance(value, list), key, f"must be a list, got {type(value).__name__}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
    elif hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
    elif hint is float:
        value = _yaml11_float(value)
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        value = float(value)
        _require(value == value and abs(value) != float("inf"), key, "must be finite")
    elif hint is str:
        _require(isinstance(value, str), key, f"must be a string, got {value!r}")
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        _require(key in names, f"{prefix}{key}", f"unknown key; allowed: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'params'}: {err}") from None


def apply_overrides(raw: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply ``key.sub=value`` overrides to a nested dict (values parsed as YAML, as ``dvc exp run -S``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
        dotted, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        except RecursionError:
            raise ConfigError(f"override {dotted.strip()!r}: value nested too deeply") from None
        node = raw
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = value
    return raw


def config_from_dict(raw: dict, overrides: typing.Iterable[str] = ()) -> Config:
    """Validate a nested dict (plus overrides) into a :class:`Config`."""
    if raw is None:
        raw = {}
    _require(isinstance(raw, dict), "params", "must be a mapping of sections")
    return _build(Config, apply_overrides(copy.deepcopy(raw), overrides))


def load_config(path: str | Path = "params.yaml", overrides: typing.Iterable[str] = ()) -> Config:
    """Read and validate a params file. Raises :class:`ConfigError` with one line on any problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read params file {path}: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a params file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    return config_from_dict(raw, overrides)
