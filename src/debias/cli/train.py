"""`debias train`, `debias config` and `debias info`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from debias.cli.app import PARAMS_OPTION, SET_OPTION, Target, Weighting, app, command_line, load_params, user_errors
from debias.errors import DebiasError

RUNS = Path("runs")  # where `debias train` puts a run without --out (ignored by git and DVC)


def pipeline_outputs(dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """What the pipeline in ``dvc_yaml`` writes: its stages' outs, metrics and plots (up to a ``${…}``)."""
    import yaml

    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    paths = []
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for entry in (stage.get(key) or []) if isinstance(stage, dict) else []:
                name = str(next(iter(entry)) if isinstance(entry, dict) else entry).split("${")[0].rstrip("/")
                if name:
                    paths.append(Path(name))
    return paths


def check_not_tracked(out: Path) -> None:
    """DebiasError if ``out`` is (inside) an output of the pipeline in ./dvc.yaml: a CLI run must not
    overwrite what `dvc repro` wrote (and `dvc status` reports)."""
    target = out.resolve()
    for path in pipeline_outputs():
        owned = path.resolve()
        if target == owned or owned in target.parents:
            raise DebiasError(f"--out {out} is inside {path}, an output of the pipeline (dvc.yaml); "
                              f"train elsewhere (the default is {RUNS}/<recipe>) or run `dvc repro`")


@app.command("train")
@user_errors
def train_command(params: Optional[Path] = PARAMS_OPTION, set_: Optional[list[str]] = SET_OPTION,
                  weighting: Optional[Weighting] = typer.Option(None, "--weighting", "-w", help="Replaces the param `weighting`."),
                  target: Optional[Target] = typer.Option(None, "--target", "-t", help="Replaces the param `target`."),
                  out: Optional[Path] = typer.Option(None, "--out", "-o", help=f"The run folder (default {RUNS}/<weighting>-<target>-<digest of the training params>)."),
                  resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/checkpoint.pt if present."),
                  progress: bool = typer.Option(True, "--progress/--no-progress", help="Report progress (a bar on a terminal, else a line every 10 s).")) -> None:
    """Train one recipe into its own run folder (resumable).

    The folder holds checkpoint.pt, snapshots/, train_log.tsv, timestep_loss.tsv and dvclive/; a data folder is prepared once beside it (prepared-<digest>/, read as a memory map). With train.devices cuda/auto it uses every visible GPU (DDP through
    torchrun); under `torchrun --nproc-per-node N -m debias train` likewise."""
    from debias.data.datasets import training_set
    from debias.runtime import relaunch_on_all_gpus
    from debias.train.loop import train
    from debias.train.rundir import run_key

    sets = [*(set_ or []), *([f"weighting={weighting}"] if weighting else []), *([f"target={target}"] if target else [])]
    cfg = load_params(params, sets)
    out = out if out is not None else RUNS / run_key(cfg)
    check_not_tracked(out)
    dataset = training_set(cfg.data, out.parent)  # a folder: prepared beside the run (bounded memory), or reused
    relaunch_on_all_gpus(cfg.train.devices, command_line())
    result = train(cfg, out, dataset, resume=resume, progress=progress)
    if result.is_main_process:
        loss = f", last logged loss {result.loss:.4g}" if result.loss is not None else ""
        done = "already finished" if result.step == result.start_step else f"trained steps {result.start_step}→{result.step}"
        typer.echo(f"{result.checkpoint}: {done}{loss}")


@app.command("prune")
@user_errors
def prune_command(params: Optional[Path] = PARAMS_OPTION, set_: Optional[list[str]] = SET_OPTION,
                  folder: Optional[Path] = typer.Option(None, "--dir", help="The folder of training states (default: the train stage's, $DEBIAS_STATES or checkpoints/; or runs/ of debias train)."),
                  keep: Optional[list[str]] = typer.Option(None, "--keep", help="Also keep this recipe's state (a folder name; repeatable)."),
                  dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed.")) -> None:
    """Remove the training states of other recipes, keeping the current params' one.

    The train stage keeps one state per recipe, <weighting>-<target>-<digest>/, in one folder that every
    workspace of the project shares (the main workspace, --temp copies, queue workers), so that experiments
    never erase each other's training; this is the one command that deletes them. Run it in the main workspace."""
    import shutil

    from debias.pipeline import training_states
    from debias.train.rundir import CHECKPOINT, run_key

    folder = folder if folder is not None else training_states()
    if not folder.is_dir():
        raise DebiasError(f"{folder} is not a folder of training states")
    kept = {run_key(load_params(params, set_)), *(keep or [])}
    states = sorted(p for p in folder.iterdir() if p.is_dir() and (p / CHECKPOINT).is_file() and p.name not in kept)
    for state in states:
        if not dry_run:
            shutil.rmtree(state)
        typer.echo(f"{'would remove' if dry_run else 'removed'} {state}")
    typer.echo(f"kept {', '.join(sorted(kept))}; {len(states)} other state(s) {'found' if dry_run else 'removed'}")


@app.command("config")
@user_errors
def config_command(params: Optional[Path] = PARAMS_OPTION, set_: Optional[list[str]] = SET_OPTION) -> None:
    """Validate the params (plus overrides) for every stage of the pipeline and print them resolved, as YAML;
    notes on stderr."""
    import yaml

    from debias.limits import training_notes

    cfg = load_params(params, set_, pipeline=True)
    for note in training_notes(cfg.train.steps, cfg.train.warmup_steps, cfg.train.snapshot_steps):
        typer.echo(note, err=True)
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())


@app.command("info")
def info_command() -> None:
    """Versions, devices and the registered names."""
    import torch

    from debias import __version__
    from debias.diffusion.schedule import SCHEDULES
    from debias.diffusion.targets import TARGETS
    from debias.diffusion.weighting import WEIGHTINGS
    from debias.diffusion.densities import DENSITIES
    from debias.catalog import EMAS
    from debias.solvers import SOLVERS

    cuda = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
    rows = [("debias", __version__), ("torch", f"{torch.__version__} ({cuda})"),
            ("weightings", ", ".join(WEIGHTINGS)), ("targets", ", ".join(TARGETS)),
            ("schedules", ", ".join(SCHEDULES)), ("solvers", ", ".join(SOLVERS)),
            ("timesteps", ", ".join(DENSITIES)), ("emas", ", ".join(EMAS) + " (debias phema)")]
    for key, value in rows:
        typer.echo(f"{key:<11} {value}")
