"""Typed, validated configuration: one frozen dataclass per params.yaml section.

``load_config(path, overrides)`` reads params.yaml, applies ``key.sub=value`` overrides (``dvc exp run -S``'s syntax, values
in YAML) and validates once (:mod:`debias.schema`): each section, then what a later stage would refuse across sections
(:func:`check_across_sections`). The first problem is a :class:`ConfigError` naming the key and what is allowed.

Names (weightings, targets, schedules, datasets, solvers, spacings, metrics, devices, precisions) come
from :mod:`debias.catalog`, which every registry implements; the dataclass defaults are the values params.yaml spells out
(tests/test_config.py checks that they agree), and the CLI takes its defaults from here.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from debias.catalog import (ARITHMETIC, DATA_LOADING, DATASETS, DEVICES, EMAS, INCEPTION_BATCH_SIZE, METRICS, PHEMA_STD_MAX, PRECISIONS,
                            PRESETS, SCHEDULES, SOLVER_OPTIONS, SOLVERS, SPACINGS, TARGETS, TIMESTEP_DENSITIES,
                            WEIGHT_SPACES, WEIGHTINGS, option_problem)
from debias.limits import grid_problem, sets_problem, unet_problem
from debias.schema import ConfigError, apply_overrides, build, one_of, read_params, require

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "DiffusionConfig", "TrainConfig", "SampleConfig",
           "EvalConfig", "AnalyzeConfig", "WeightingParams", "TRAINING_SECTIONS", "check_across_sections",
           "config_from_dict", "load_config"]

# the top-level keys a training run depends on (everything else is sampling, evaluation, analysis)
TRAINING_SECTIONS = ("weighting", "target", "seed", "data", "model", "diffusion", "loss", "train")


@dataclass(frozen=True)
class DataConfig:
    """What to train on. ``name`` is a dataset of the registry in :mod:`debias.data.datasets`."""

    name: str = "digits"
    path: str | None = None          # image folder for ``name: folder``
    image_size: int = 8
    channels: int = 1                # 1 = grey, 3 = RGB
    class_cond: bool = False         # labels from the dataset (digits) or sub-folder names (folder)
    random_flip: bool = False
    on_error: str = "skip"           # a corrupt image in a folder: skip it (reported) or fail
    max_images: int | None = None    # use only the first N images (quick runs)

    def __post_init__(self):
        one_of(self.name, DATASETS, "data.name")
        require(4 <= self.image_size <= 4096, "data.image_size", "must be in [4, 4096]")
        require(self.channels in (1, 3), "data.channels", f"must be 1 or 3, got {self.channels}")
        one_of(self.on_error, ("skip", "fail"), "data.on_error")
        require(self.max_images is None or self.max_images >= 1, "data.max_images", "must be >= 1 or null")
        require(self.name != "folder" or bool(self.path), "data.path", "is required when data.name is 'folder'")
        require(self.name == "folder" or self.path is None, "data.path",
                f"is read only with data.name: folder (data.name is {self.name!r}, a built-in dataset); drop it or "
                "set data.name=folder")


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
        require(1 <= self.model_channels <= 4096, "model.model_channels", "must be in [1, 4096]")
        require(self.model_channels % 32 == 0, "model.model_channels", "must be a multiple of 32 (GroupNorm uses 32 groups)")
        require(1 <= len(self.channel_mult) <= 12 and all(1 <= m <= 64 for m in self.channel_mult),
                "model.channel_mult", "must be a list of 1 to 12 integers in [1, 64]")
        require(1 <= self.num_res_blocks <= 64, "model.num_res_blocks", "must be in [1, 64]")
        require(all(r >= 1 for r in self.attention_resolutions), "model.attention_resolutions", "must be positive")
        require(self.num_head_channels >= 1, "model.num_head_channels", "must be >= 1")
        require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process."""

    steps: int = 1000
    schedule: str = "linear"

    def __post_init__(self):
        require(2 <= self.steps <= 100_000, "diffusion.steps", "must be in [2, 100000]")
        one_of(self.schedule, SCHEDULES, "diffusion.schedule")
        require(self.schedule != "linear" or self.steps >= 20, "diffusion.steps", "must be >= 20 for the linear schedule")


@dataclass(frozen=True)
class WeightingParams:
    """Hyper-parameters of the weightings (section ``loss``; :mod:`debias.diffusion.weighting`)."""

    p2_gamma: float = 1.0        # γ of P2
    p2_k: float = 1.0            # k of P2
    min_snr_gamma: float = 5.0   # γ of Min-SNR
    sigmoid_bias: float = 0.0    # b of the sigmoid weighting (tune per dataset)
    edm_sigma_data: float = 0.5  # σ_data of EDM
    normalize: bool = False      # rescale the applied weight to mean 1 over t
    weight_space: str = "eps"    # eps: w on the ε-MSE (carried into the target's space) | target: w on the target's MSE
    importance_correction: bool = False  # × 1/(T p(t)) for train.timestep_sampler's p: the uniform objective
    learned_base: str = "constant"  # weighting: learned — the weighting w that the learned e^{-u(t)} multiplies

    def __post_init__(self):
        require(self.p2_k > 0, "loss.p2_k", "must be > 0")
        require(self.p2_gamma >= 0, "loss.p2_gamma", "must be >= 0")
        require(self.min_snr_gamma > 0, "loss.min_snr_gamma", "must be > 0")
        require(self.edm_sigma_data > 0, "loss.edm_sigma_data", "must be > 0")
        one_of(self.weight_space, WEIGHT_SPACES, "loss.weight_space")
        one_of(self.learned_base, tuple(w for w in WEIGHTINGS if w != "learned"), "loss.learned_base")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0           # max global grad norm; 0 disables clipping
    ema: str = "traditional"         # traditional: one EMA per ema_rates | phema: EDM2's power-function profiles
    ema_rates: list[float] = field(default_factory=lambda: [0.999])
    ema_warmup: bool = True          # rate_k = min(rate, (1 + k)/(10 + k)) so short runs get a useful EMA
    phema_std: list[float] = field(default_factory=lambda: [0.05, 0.10])  # σ_rel of the profiles (debias.phema)
    phema_every: int = 100           # steps between snapshots of the profiles (and at the end)
    precision: str = "fp32"
    checkpoint_every: int = 500
    snapshot_steps: list[int] = field(default_factory=lambda: [500, 1000, 1500])  # those beyond steps are skipped
    log_every: int = 50
    devices: str = "cpu"
    data_loading: str = "auto"       # memory | stream (from the prepared array's memory map) | auto (debias.data.batches)
    num_workers: int = 2             # threads reading streamed batches ahead of the step (0: in the training thread)
    compile: bool = False
    timestep_sampler: str = "uniform"   # where t is drawn (debias.diffusion.densities)
    timestep_loc: float | None = None   # the log-SNR density's location / scale (null: its default)
    timestep_scale: float | None = None

    def __post_init__(self):
        require(self.steps >= 1, "train.steps", "must be >= 1")
        one_of(self.timestep_sampler, TIMESTEP_DENSITIES, "train.timestep_sampler")
        require(self.timestep_loc is None or abs(self.timestep_loc) <= 100, "train.timestep_loc",
                "must be null or a log-SNR in [-100, 100]")
        require(self.timestep_scale is None or 0 < self.timestep_scale <= 100, "train.timestep_scale",
                "must be null or in (0, 100]")
        require(1 <= self.batch_size <= 1_000_000, "train.batch_size", "must be in [1, 1000000]")
        require(0 < self.lr < 1, "train.lr", "must be in (0, 1)")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        require(len(self.ema_rates) >= 1 and all(0 <= r < 1 for r in self.ema_rates), "train.ema_rates",
                 "must be a non-empty list of rates in [0, 1)")
        one_of(self.ema, EMAS, "train.ema")
        require(1 <= len(self.phema_std) <= 8 and len(set(self.phema_std)) == len(self.phema_std)
                and all(0 < s < PHEMA_STD_MAX for s in self.phema_std), "train.phema_std",
                f"must be 1 to 8 distinct EMA lengths σ_rel in (0, {PHEMA_STD_MAX:.4f})")
        require(self.phema_every >= 1, "train.phema_every", "must be >= 1")
        one_of(self.precision, PRECISIONS, "train.precision")
        require(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        require(all(s >= 1 for s in self.snapshot_steps), "train.snapshot_steps", "must be positive step numbers")
        require(self.log_every >= 1, "train.log_every", "must be >= 1")
        one_of(self.devices, DEVICES, "train.devices")
        one_of(self.data_loading, DATA_LOADING, "train.data_loading")
        require(0 <= self.num_workers <= 64, "train.num_workers", "must be in [0, 64]")


@dataclass(frozen=True)
class SampleConfig:
    """Sampling: the pipeline runs every solver in ``solvers`` at every count in ``steps``."""

    solvers: list[str] = field(default_factory=lambda: ["ddpm", "ddim", "dpmsolver++", "unipc"])
    steps: list[int] = field(default_factory=lambda: [20])
    num_samples: int = 128
    batch_size: int = 128
    seed: int = 0
    preset: str = "none"             # upstream: every setting below as the paper's code (solvers/presets.py)
    clip_x0: bool = True
    spacing: str = "auto"            # auto: each solver's measured best (solvers/__init__.py), or a spacing name
    denoise_to_zero: bool = True     # end at σ = 0 (the last call's x̂0), else at the grid's last noise level
    arithmetic: str = "debias"       # upstream: the original's float arithmetic (solvers/__init__.py, slower)
    eta: float = SOLVER_OPTIONS["eta"].default              # DDIM η
    order: int = SOLVER_OPTIONS["order"].default            # DPM-Solver / UniPC order
    unipc_variant: str = SOLVER_OPTIONS["variant"].default  # UniPC B(h): bh1 or bh2
    lower_order_final: int = SOLVER_OPTIONS["lower_order_final"].default  # DPM-Solver: runs of fewer steps lower their last orders
    ema: bool = True                 # sample the first EMA's weights
    ema_std: float | None = None     # sample the post-hoc EMA of this σ_rel (needs train.ema: phema; debias.phema)
    precision: str = "fp32"          # fp32 (TF32 matmuls on CUDA) | bf16 | fp16 (CUDA): autocast
    compile: bool = False
    device: str = "auto"             # auto: every visible GPU (one process each), else the CPU
    chunk_size: int = 1024           # samples per chunk file (the unit of streaming and of resuming)

    def __post_init__(self):
        require(len(self.solvers) >= 1, "sample.solvers", "must name at least one solver")
        for solver in self.solvers:
            one_of(solver, SOLVERS, "sample.solvers")
        require(len(self.steps) >= 1 and all(1 <= s <= 10_000 for s in self.steps), "sample.steps",
                 "must be a non-empty list of step counts in [1, 10000]")
        require(self.num_samples >= 1, "sample.num_samples", "must be >= 1")
        require(self.batch_size >= 1, "sample.batch_size", "must be >= 1")
        require(self.seed >= 0, "sample.seed", "must be >= 0")
        one_of(self.preset, PRESETS, "sample.preset")
        one_of(self.spacing, ("auto", *SPACINGS), "sample.spacing")
        one_of(self.arithmetic, ARITHMETIC, "sample.arithmetic")
        for option, key in (("eta", "eta"), ("order", "order"), ("variant", "unipc_variant"),
                            ("lower_order_final", "lower_order_final")):
            problem = option_problem(option, getattr(self, key))
            require(problem is None, f"sample.{key}", str(problem))
        require(self.ema_std is None or 0 < self.ema_std < PHEMA_STD_MAX, "sample.ema_std",
                f"must be null or an EMA length σ_rel in (0, {PHEMA_STD_MAX:.4f})")
        one_of(self.precision, PRECISIONS, "sample.precision")
        one_of(self.device, DEVICES, "sample.device")
        require(self.chunk_size >= 1, "sample.chunk_size", "must be >= 1")


@dataclass(frozen=True)
class EvalConfig:
    """FID / sFID / KID / precision-recall (and the Inception Score when the weights have logits)."""

    metrics: list[str] = field(default_factory=lambda: ["fid", "sfid", "kid", "pr"])
    inception_weights: str | None = None
    reference: str | None = None          # FID reference: null = the training set, or images/an ADM reference batch
    reference_images: int | None = 400    # use a fixed random subset of N reference images (null = all)
    kid_subset_size: int = 100
    pr_k: int = 3
    bootstrap: int = 200                  # resamples of the FID/sFID bootstrap interval (0: no intervals)
    interval_level: float = 0.95          # of the FID/sFID/KID intervals
    fid_infinity: bool = False            # also FID∞ (Chong & Forsyth 2020), extrapolated to infinitely many samples
    batch_size: int = INCEPTION_BATCH_SIZE  # images per Inception call
    device: str = "auto"

    def __post_init__(self):
        for metric in self.metrics:
            one_of(metric, METRICS, "eval.metrics")
        require(self.kid_subset_size >= 2, "eval.kid_subset_size", "must be >= 2")
        require(self.pr_k >= 1, "eval.pr_k", "must be >= 1")
        require(self.bootstrap == 0 or self.bootstrap >= 10, "eval.bootstrap", "must be 0 (no intervals) or >= 10")
        require(0 < self.interval_level < 1, "eval.interval_level", "must be in (0, 1), e.g. 0.95")
        require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        require(self.reference_images is None or self.reference_images >= 2, "eval.reference_images", "must be >= 2 or null")
        one_of(self.device, DEVICES, "eval.device")


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
    device: str = "auto"

    def __post_init__(self):
        require(self.num_images >= 1, "analyze.num_images", "must be >= 1")
        require(self.timesteps >= 1, "analyze.timesteps", "must be >= 1")
        one_of(self.color_solver, SOLVERS, "analyze.color_solver")
        one_of(self.fid_solver, SOLVERS, "analyze.fid_solver")
        require(len(self.color_steps) >= 1 and all(s >= 1 for s in self.color_steps), "analyze.color_steps",
                 "must be a non-empty list of positive step counts")
        require(self.color_samples >= 1, "analyze.color_samples", "must be >= 1")
        require(self.fid_steps >= 1, "analyze.fid_steps", "must be >= 1")
        require(self.fid_samples >= 2, "analyze.fid_samples", "must be >= 2")
        one_of(self.device, DEVICES, "analyze.device")


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
        one_of(self.weighting, WEIGHTINGS, "weighting")
        one_of(self.target, TARGETS, "target")
        require(self.seed >= 0, "seed", "must be >= 0")

    def to_dict(self) -> dict:
        """Plain nested dict (what params.yaml holds and checkpoints store)."""
        return dataclasses.asdict(self)

    def training_dict(self) -> dict:
        """The sections that determine a trained model (what a checkpoint resumes under)."""
        return {k: v for k, v in self.to_dict().items() if k in TRAINING_SECTIONS}


def check_across_sections(cfg: Config, pipeline: bool = False) -> None:
    """ConfigError for what a later stage would refuse, in its words (:mod:`debias.limits`): a UNet that the data and
    model params cannot build; a step count that a solver's grid cannot place on the chain of diffusion.steps
    (sample.steps of each of sample.solvers, analyze.color_steps, analyze.fid_steps); sample.ema_std without
    train.ema: phema; and with ``pipeline`` (the stages, `debias config`, `debias sweep`: the whole pipeline will
    run) set sizes that eval.metrics cannot use — a command that trains or samples scores nothing. Run by
    :func:`config_from_dict`, not by the dataclasses, so that a command's flags (``dataclasses.replace``) answer to
    the checks of the code they reach."""
    d, m, s, e, a = cfg.data, cfg.model, cfg.sample, cfg.eval, cfg.analyze
    runs = [*((solver, steps, "sample.steps") for solver in s.solvers for steps in s.steps),
            *((a.color_solver, steps, "analyze.color_steps") for steps in a.color_steps),
            (a.fid_solver, a.fid_steps, "analyze.fid_steps")]
    references = {"eval.reference_images": e.reference_images, "data.max_images": d.max_images if e.reference is None
                  else None}  # the reference: a subset of eval.reference_images, of the training set if no eval.reference
    problems = [unet_problem(d.image_size, m.model_channels, m.channel_mult, m.attention_resolutions, m.num_head_channels),
                *(grid_problem(key, cfg.diffusion.steps, solver, steps, s.spacing, s.denoise_to_zero, s.preset)
                  for solver, steps, key in runs),
                sets_problem(e.metrics, s.num_samples, references, e.kid_subset_size, e.pr_k, e.fid_infinity)
                if pipeline else None,
                ("sample.ema_std", "needs train.ema: phema (the post-hoc EMA is rebuilt from the profiles it keeps)")
                if s.ema_std is not None and cfg.train.ema != "phema" else None]
    for problem in problems:
        if problem is not None:
            raise ConfigError(": ".join(problem))


def config_from_dict(raw: dict, overrides: typing.Iterable[str] = (), pipeline: bool = False) -> Config:
    """Validate a nested dict (plus overrides) into a :class:`Config`: each section, then across them
    (:func:`check_across_sections`; ``pipeline``: for every stage)."""
    raw = {} if raw is None else raw
    require(isinstance(raw, dict), "params", "must be a mapping of sections")
    cfg = build(Config, apply_overrides(copy.deepcopy(raw), overrides))
    check_across_sections(cfg, pipeline)
    return cfg


def load_config(path: str | Path = "params.yaml", overrides: typing.Iterable[str] = (), pipeline: bool = False) -> Config:
    """Read and validate a params file (``pipeline``: for every stage of the pipeline, :func:`check_across_sections`).
    Raises :class:`ConfigError` with one line on any problem."""
    return config_from_dict(read_params(path), overrides, pipeline)
