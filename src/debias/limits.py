"""What the params allow, as plain arithmetic on their values: checked by
:func:`debias.config.check_across_sections` when params are loaded, so that every stage and `debias config`
refuse a value before any work, in the words of the code that would refuse it later. Each ``*_problem``
returns the first (param, problem) or None.

- the UNet's feature maps — the image halved once per level after the first —, the attention resolutions
  they admit and the heads the attended levels split into: :func:`unet_problem`, which
  :func:`debias.models.factory.unet_kwargs` checks too;
- the step counts a solver's grid places on a chain of T steps: :func:`grid_problem` — the grid of the sample
  params and preset, as :func:`debias.sampling.plan_for` resolves it — through :func:`timesteps_problem`, the
  refusals of :func:`debias.solvers.timesteps.select_timesteps` (tests/test_limits.py checks that they agree);
- the set sizes the metrics need (:func:`debias.metrics.scores.compute_metrics`): :func:`sets_problem`.

:func:`training_notes` are what valid training params do that may surprise.
"""

from __future__ import annotations

from collections.abc import Sequence

from debias.catalog import DISCRETE_SPACINGS, MULTISTEP_SOLVERS, PRESET_GRIDS, SOLVER_SPACINGS


def level_sizes(image_size: int, levels: int) -> list[int]:
    """The side of the UNet's feature maps at each of its ``levels`` levels (the image's at the first)."""
    return [image_size // 2**level for level in range(levels)]


def unet_problem(image_size: int, model_channels: int, channel_mult: Sequence[int],
                 attention_resolutions: Sequence[int], num_head_channels: int) -> tuple[str, str] | None:
    """The first (param, problem) that keeps a UNet of these params from being built, or None: an image size
    the levels cannot halve, an attention resolution that is no level's size, or attended channels (those of
    each level with attention, and of the last level, where the middle block attends) that do not split into
    heads of ``num_head_channels``."""
    levels = len(channel_mult)
    if image_size % 2 ** (levels - 1):
        return "data.image_size", (f"image size {image_size} cannot be halved {levels - 1} times "
                                   f"(model.channel_mult has {levels} levels)")
    sizes = level_sizes(image_size, levels)
    for res in attention_resolutions:
        if res not in sizes:
            return "model.attention_resolutions", (f"attention resolution {res} never occurs in this UNet "
                                                   f"(its feature maps are {sizes})")
    attended = sorted({levels - 1, *(sizes.index(res) for res in attention_resolutions)})
    for level in attended:
        channels = channel_mult[level] * model_channels
        if channels % num_head_channels:
            return "model.num_head_channels", f"{channels} channels do not split into heads of {num_head_channels}"
    return None


def ddim_stride_exists(num_timesteps: int, steps: int) -> bool:
    """Whether an integer stride s < T gives exactly ``steps`` timesteps ``range(0, T, s)`` (the DDIM respacing)."""
    return any(-(-num_timesteps // stride) == steps for stride in range(1, num_timesteps))


def timesteps_problem(num_timesteps: int, steps: int, spacing: str, multistep: bool) -> str | None:
    """Why discrete ``spacing`` cannot place ``steps`` distinct timesteps on a chain of ``num_timesteps``
    (None if it can; a continuous spacing places any number). The multistep variants of ``linspace`` and
    ``leading`` place one point more and drop the smallest."""
    T = num_timesteps
    if spacing not in DISCRETE_SPACINGS:
        return None
    if not 1 <= steps <= T:
        return f"cannot sample with {steps} steps: the model's diffusion chain has {T} steps (choose 1..{T})"
    if spacing == "ddim" and not ddim_stride_exists(T, steps):
        return (f"'ddim' spacing has no integer stride giving exactly {steps} of {T} steps; use another step count "
                "or spacing")
    # the multistep linspace and leading place steps + 1 points and drop the smallest, so they repeat a timestep
    # at steps = T — but for linspace on T = 2, whose points [0.5, 1] round half to even: [0, 1]
    if multistep and spacing in ("linspace", "leading") and steps == T and (spacing, T) != ("linspace", 2):
        return (f"{spacing!r} spacing repeats timesteps for {steps} steps of a {T}-step chain; use fewer steps or "
                "another spacing")
    return None


def grid_problem(key: str, num_timesteps: int, solver: str, steps: int, spacing: str, denoise_to_zero: bool,
                 preset: str) -> tuple[str, str] | None:
    """Why ``solver`` cannot sample at ``steps`` (the value of param ``key``) on a chain of ``num_timesteps``, on the
    grid that the sample params ``spacing`` and ``denoise_to_zero`` give, or the ``preset`` fixes; None if it can."""
    grid = {"spacing": None if spacing == "auto" else spacing, "denoise_to_zero": denoise_to_zero,
            **PRESET_GRIDS[preset].get(solver, {})}
    spacing, to_zero = grid["spacing"] or SOLVER_SPACINGS[solver], grid["denoise_to_zero"]
    # without the end at σ = 0, the spacing places one point more (debias.solvers.grid.make_grid)
    problem = timesteps_problem(num_timesteps, steps if to_zero else steps + 1, spacing,
                                to_zero and solver in MULTISTEP_SOLVERS)
    return None if problem is None else (key, f"{solver} on the {spacing} spacing: {problem}")


def sets_problem(metrics: Sequence[str], num_samples: int, references: dict[str, int | None], kid_subset_size: int,
                 pr_k: int, fid_infinity: bool = False) -> tuple[str, str] | None:
    """Why ``metrics`` cannot score ``num_samples`` samples against a reference of at most each of ``references``
    ({param: its value, None when it does not bound the reference}) images; None if they can."""
    bounds = sorted((n, key) for key, n in references.items() if n is not None)
    n_ref, ref_key = bounds[0] if bounds else (None, "")
    sizes = f"sample.num_samples={num_samples}" + (f", {ref_key}={n_ref}" if n_ref is not None else "")
    smaller = min(num_samples, n_ref if n_ref is not None else num_samples)
    if {"fid", "sfid"} & set(metrics) and smaller < 2:
        return "sample.num_samples" if num_samples < 2 else ref_key, f"FID needs at least 2 images per set ({sizes})"
    if "kid" in metrics and kid_subset_size > smaller:
        return "eval.kid_subset_size", (f"KID subset size {kid_subset_size} is larger than the image sets ({sizes}); "
                                        "lower the KID subset size")
    if "pr" in metrics and pr_k >= smaller:
        return "eval.pr_k", f"precision/recall k = {pr_k} needs more than {pr_k} images per set ({sizes}); lower k"
    if fid_infinity and ("fid" not in metrics or num_samples < 3):
        return "eval.fid_infinity", (f"FID∞ needs fid in eval.metrics and at least 3 samples ({sizes}), to fit FID at "
                                     "2 or more sample counts")
    return None


def training_notes(steps: int, warmup_steps: int, snapshot_steps: Sequence[int]) -> list[str]:
    """One ``note:`` line per surprise of valid training params (train.steps, train.warmup_steps,
    train.snapshot_steps): snapshot steps beyond the end, or a warm-up longer than training — the learning rate
    never reaches train.lr."""
    beyond = [s for s in snapshot_steps if s > steps]
    lines = [f"note: train.snapshot_steps {', '.join(map(str, beyond))} lie beyond train.steps={steps}; no snapshot "
             "is kept there"] if beyond else []
    if warmup_steps > steps:
        lines.append(f"note: train.warmup_steps={warmup_steps} is above train.steps={steps}: the learning rate rises "
                     f"to {steps / warmup_steps:.0%} of train.lr and never reaches it")
    return lines
