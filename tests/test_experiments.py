"""Experiments in the micro project (tests/micro_project.py): `dvc exp run -S weighting=...`, the README's
commands (the CLI, the seeded sweep, the own-images example, the post-hoc EMA), training states shared by every
workspace, two runs of one recipe, GPU shares."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from debias.checkpoints import load_checkpoint

from micro_project import MICRO, REPO, dvc, run

pytestmark = pytest.mark.slow


def test_experiment_with_another_weighting(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline run"], project)
    dvc("exp", "run", "--temp", "-S", "weighting=p2", "-n", "p2-run", cwd=project)  # the workspace stays debias
    table = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    from debias.comparison import experiments_from_exp_show

    experiments = {e["name"]: e for e in experiments_from_exp_show(table)}
    assert "p2-run" in experiments
    assert experiments["p2-run"]["params"]["weighting"] == "p2"
    assert experiments["p2-run"]["metrics"]["metrics/ddim.json"]["ddim"]["fid"] > 0


README = REPO / "README.md"
RECIPES_PAGE = REPO / "docs" / "recipes.md"
# README commands that need what a test cannot have: a released 256x256 checkpoint, a GPU
NEEDS_OUTSIDE = ("ema_0.9999_", "VIRTUAL_", "--device cuda", "celebahq")
# the README's CLI block at the micro project's sizes: its sample step count (2 and 4, not 20), training steps, its reference set (digits has 1797 images)
MICRO_NAMES = {"steps_20.npz": "steps_4.npz", "train.steps=500": "train.steps=12", "--reference-images 1000": "--reference-images 16"}
# the README's sweep queues 4 recipes x 3 seeds (12 runs); the test runs each other recipe once, seed 0
MICRO_SWEEP = {"-S weighting=constant,p2,min_snr,debias -S seed=0,1,2": "-S weighting=constant,p2,min_snr -S seed=0"}


def readme_commands(section: str, page: Path = README) -> list[str]:
    """The `debias`/`dvc` lines of the bash blocks in one section of the README (or a docs ``page``), as written
    (comments dropped)."""
    text = page.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in lines]
    return [c for c in commands if re.match(r"(debias|dvc|for) ", c) and not any(s in c for s in NEEDS_OUTSIDE)]


def test_readme_commands_run_as_written(project):
    """Every command of the README's CLI and comparison blocks, in order, in the micro project; the CLI
    writes nowhere the pipeline owns (`dvc status` stays clean)."""
    cli_block, sweep = readme_commands("What it does"), readme_commands("Reproducing the paper's comparison")
    assert len(cli_block) >= 8 and any(c.startswith("debias train") for c in cli_block)
    assert any("dvc exp show" in c for c in sweep) and any(c.startswith("debias sweep") for c in sweep)
    before = {p.relative_to(project) for p in (project / "models").rglob("*")}
    for command in cli_block:
        for default, micro in MICRO_NAMES.items():
            command = command.replace(default, micro)
        run(["bash", "-c", command], project)  # the README's shell, this venv first on PATH
    assert {p.relative_to(project) for p in (project / "models").rglob("*")} == before
    assert json.loads(dvc("status", "--json", cwd=project).stdout) == {}
    run_dirs = list((project / "runs").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("p2-eps-")
    assert (run_dirs[0] / "checkpoint.pt").is_file() and (run_dirs[0] / "dvclive" / "metrics.json").is_file()
    for name in ("grid.png", "x.npz", "analysis/x0_bias.tsv", "compare/comparison.md"):
        assert (project / name).is_file(), name
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "before the sweep"], project)
    assert any(written in command for command in sweep for written in MICRO_SWEEP), sweep
    for command in sweep:
        for written, micro in MICRO_SWEEP.items():
            command = command.replace(written, micro)
        run(["bash", "-c", f"export COLUMNS=120; {command}"], project)
    table = run(["bash", "-c", f"export COLUMNS=120; {next(c for c in sweep if 'dvc exp show' in c)}"], project).stdout
    assert "…" not in table and max(len(line) for line in table.splitlines()) <= 120, table
    recipes = ["constant-eps-seed=0", "p2-eps-seed=0", "min_snr-eps-seed=0"]
    for name in (*recipes, "ddim.fid", "mse"):
        assert name in table, table
    names = dvc("exp", "ls", "--name-only", cwd=project).stdout.split()
    assert sorted(names) == sorted(recipes)  # queued by `debias sweep`: named by recipe, not at random
    from debias.comparison import experiments_from_exp_show

    shown = experiments_from_exp_show(json.loads(dvc("exp", "show", "--json", cwd=project).stdout))
    weighting = {e["name"]: e["params"]["weighting"] for e in shown if e["name"] in names}
    assert all(name.startswith(f"{weighting[name]}-") for name in names), weighting
    # the overlay: the workspace (the baseline, debias) and every experiment, one line each
    overlay = run(["bash", "-c", f"{next(c for c in sweep if c.startswith('dvc plots diff'))} --json"], project).stdout
    for title, plots in json.loads(overlay)["data"].items():
        assert sorted(plots[0]["revisions"]) == sorted(["workspace", *names]), title
    page = (project / "dvc_plots" / "index.html").read_text()
    assert all(f'"rev": "{name}"' in page for name in ["workspace", *names])
    # each recipe once (the workspace, its commit and an experiment repeating it are one)
    first_table = (project / "compare" / "comparison.md").read_text().split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in first_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    weightings = [row[1] for row in rows]
    assert len(weightings) == len(set(weightings)) and {"debias", "constant", "p2", "min_snr"} <= set(weightings), rows


def test_the_own_images_example_runs_as_written(project, tmp_path):
    """The README's first example, on a folder of 12 colour images of odd sizes in a copy of the micro project:
    `debias config` accepts the params and `dvc exp run` trains, samples and scores at 32² in colour."""
    from PIL import Image

    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True)
    rng = np.random.default_rng(0)
    (copy / "my_images").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(copy / "my_images" / f"{i}.png")
    run(["git", "add", "-A"], copy)
    run(["git", "commit", "-qm", "my images"], copy)
    check, experiment = readme_commands("Your own images")
    assert check.startswith("debias config") and experiment.startswith("dvc exp run")
    assert "image_size: 32" in run(["bash", "-c", check], copy).stdout
    run(["bash", "-c", experiment], copy)
    assert np.load(copy / "data" / "prepared" / "images.npy", mmap_mode="r").shape == (12, 3, 32, 32)
    with np.load(copy / "samples" / "ddim" / "steps_2.npz") as samples:
        assert samples[samples.files[0]].shape[1:] in ((32, 32, 3), (3, 32, 32))
    assert json.loads((copy / "metrics" / "ddim.json").read_text())["ddim"]["fid"] > 0


def test_the_ema_length_is_swept_without_retraining(project, tmp_path):
    """The README's post-hoc EMA commands, in order, on the micro recipe (learned weighting, a snapshot every
    3 steps): `dvc exp run -S train.ema=phema` exports the profiles to models/phema/, each `-S
    sample.ema_std=…` then reruns only sampling and scoring (and the report), from the EMA of that length
    rebuilt post hoc, and `debias phema` writes that EMA as a checkpoint."""
    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())  # earlier tests leave other values behind
    params["train"].update(steps=MICRO["train"]["steps"], phema_every=3)
    params["weighting"] = "learned"
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "add", "-A"], copy)
    run(["git", "commit", "-qm", "the post-hoc EMA recipe"], copy)
    train, sweep, rebuild = readme_commands("Beyond the paper: the EMA length chosen after training", RECIPES_PAGE)
    assert train.startswith("dvc exp run") and sweep.startswith("for s in 0.05 ") and rebuild.startswith("debias phema")
    run(["bash", "-c", train], copy)
    assert sorted(p.name for p in (copy / "models" / "phema").iterdir()) == \
        [f"phema-{s:07d}.pt" for s in (3, 6, 9, 12)]
    fid = json.loads((copy / "metrics" / "ddim.json").read_text())["ddim"]["fid"]
    swept = run(["bash", "-c", sweep.replace("0.05 0.10 0.15 0.20 0.25", "0.13")], copy).stdout  # one length of five
    ran = {line.split("'")[1] for line in swept.splitlines() if line.startswith("Running stage")}
    assert ran == {"sample@ddim", "sample@unipc", "evaluate@ddim", "evaluate@unipc", "report"}, swept
    assert json.loads((copy / "metrics" / "ddim.json").read_text())["ddim"]["fid"] != fid
    assert "ema-std-0.13" in dvc("exp", "ls", "--name-only", cwd=copy).stdout.split()
    run(["bash", "-c", rebuild], copy)
    out = copy / rebuild.split("--out ")[1].split()[0]
    assert list(load_checkpoint(out).ema) == ["phema-0.13"]
    plots = json.loads((copy / "logs" / "dvclive" / "plots" / "custom" / "weighting.json").read_text())
    assert any(point["u"] != 0 for point in plots)


def test_another_recipe_never_erases_a_training_state(project):
    """`dvc exp run train -S weighting=snr` (a recipe no other test trains) trains into its own state; after `dvc exp
    apply` of the baseline, `dvc repro` re-exports the baseline without training and a longer run resumes it (the
    experiments run up to the train stage: the states are its business)."""
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline for the recipe-state test", "--allow-empty"], project)
    dvc("exp", "run", "-n", "state-baseline", cwd=project)
    states = project / "checkpoints"
    before = {p.name: (p / "checkpoint.pt").read_bytes() for p in states.iterdir()}
    model = (project / "models" / "model.pt").read_bytes()
    dvc("exp", "run", "train", "-n", "state-snr", "-S", "weighting=snr", cwd=project)
    after = {p.name: (p / "checkpoint.pt").read_bytes() for p in states.iterdir()}
    assert set(before) < set(after) and all(after[name] == data for name, data in before.items())
    dvc("exp", "apply", "state-baseline", cwd=project)
    repro = dvc("repro", cwd=project)
    assert "Running stage 'train'" not in repro.stdout or "already trained" in repro.stdout + repro.stderr
    assert (project / "models" / "model.pt").read_bytes() == model
    log = (project / "logs" / "train_log.tsv").read_text()
    longer = dvc("exp", "run", "train", "-n", "state-longer", "-S", f"train.steps={MICRO['train']['steps'] + 6}", cwd=project)
    assert f"resuming at step {MICRO['train']['steps']}" in longer.stdout + longer.stderr
    resumed = (project / "logs" / "train_log.tsv").read_text()
    assert resumed.startswith(log) and len(resumed.splitlines()) == len(log.splitlines()) + 2


def micro_copy(project: Path, folder: Path, **params) -> Path:
    """A copy of the micro project at its micro params (earlier tests leave other values) plus ``params``, with
    no training state and no run cache (which would restore a recipe's outputs instead of training it), committed."""
    shutil.copytree(project, folder, symlinks=True)
    shutil.rmtree(folder / "checkpoints")
    shutil.rmtree(folder / ".dvc" / "cache" / "runs", ignore_errors=True)
    values = yaml.safe_load((folder / "params.yaml").read_text())
    values["weighting"] = "debias"
    values["train"].update(MICRO["train"])
    for key, value in params.items():
        values[key].update(value) if isinstance(value, dict) else values.update({key: value})
    (folder / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    run(["git", "add", "-A"], folder)
    run(["git", "commit", "-qm", "micro params", "--allow-empty"], folder)
    return folder


def test_a_recipe_trained_in_any_workspace_resumes_in_any_other(project, tmp_path, monkeypatch):
    """The training states live where every workspace finds them: `dvc exp run --temp` (constant) and a queued
    experiment (p2) train into the main workspace's checkpoints/, one copy each; a `--temp` run of p2 with more
    steps resumes p2's state (it says so) and ends bitwise where an uninterrupted run of those steps ends
    (DEBIAS_STATES: an empty folder elsewhere); `debias prune --dry-run` in the workspace lists both."""
    copy = micro_copy(project, tmp_path / "project")
    dvc("exp", "run", "--temp", "train", "-n", "constant-12", "-S", "weighting=constant", cwd=copy)
    dvc("exp", "run", "--queue", "train", "-n", "p2-12", "-S", "weighting=p2", cwd=copy)
    dvc("exp", "run", "--run-all", cwd=copy)
    states = copy / "checkpoints"
    assert sorted(p.name.rsplit("-", 1)[0] for p in states.iterdir()) == ["constant-eps", "p2-eps"]
    assert not (copy / ".dvc" / "tmp" / "exps").exists() or not list((copy / ".dvc" / "tmp" / "exps").rglob("*.pt"))
    p2 = next(states.glob("p2-eps-*"))
    assert load_checkpoint(p2 / "checkpoint.pt").step == MICRO["train"]["steps"]
    longer = ["-S", "weighting=p2", "-S", f"train.steps={MICRO['train']['steps'] + 6}"]
    resumed = dvc("exp", "run", "--temp", "train", "-n", "p2-18", *longer, cwd=copy)
    assert f"{p2}/checkpoint.pt: resuming at step {MICRO['train']['steps']} of 18" in resumed.stdout + resumed.stderr
    monkeypatch.setenv("DEBIAS_STATES", str(tmp_path / "elsewhere"))
    whole = dvc("exp", "run", "--temp", "train", "-n", "p2-18-uninterrupted", *longer, cwd=copy)
    monkeypatch.delenv("DEBIAS_STATES")
    assert "resuming" not in whole.stdout + whole.stderr
    ends = [load_checkpoint(folder / p2.name / "checkpoint.pt") for folder in (states, tmp_path / "elsewhere")]
    assert [end.step for end in ends] == [18, 18]
    for part in ("model", "ema"):
        a, b = (flat_tensors(getattr(end, part)) for end in ends)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    from debias.comparison import experiments_from_exp_show

    shown = {e["name"]: e["metrics"]["logs/dvclive/metrics.json"]
             for e in experiments_from_exp_show(json.loads(dvc("exp", "show", "--json", cwd=copy).stdout))}
    assert {k: shown["p2-18"][k] for k in ("step", "loss", "mse")} == \
        {k: shown["p2-18-uninterrupted"][k] for k in ("step", "loss", "mse")}
    pruned = run([sys.executable, "-m", "debias", "prune", "--dry-run"], copy).stdout
    assert {line for line in pruned.splitlines() if line.startswith("would remove")} == \
        {f"would remove checkpoints/{state.name}" for state in states.iterdir()}, pruned


def flat_tensors(tree, prefix: str = "") -> dict:
    """The tensors of a nested dict of state dicts, by dotted key."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flat_tensors(value, f"{prefix}{key}.").items()}
    return {prefix: tree}


def stage_workspace(project: Path, folder: Path, weighting: str = "debias", **train) -> Path:
    """A bare workspace of the micro project, as DVC makes for an experiment: its stages, data/prepared and
    params (micro, with ``weighting`` and ``train`` changed)."""
    shutil.copytree(project / "stages", folder / "stages")
    shutil.copytree(project / "data" / "prepared", folder / "data" / "prepared")
    values = yaml.safe_load((project / "params.yaml").read_text())
    values["weighting"] = weighting
    values["train"].update({**MICRO["train"], **train})
    (folder / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    return folder


def start_stage(folder: Path, command: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
    """A stage started in ``folder``; its stderr goes to a file, read while it runs."""
    log = folder / "stage.log"
    with open(log, "w") as err:
        return subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=err, env=env), log


def wait_for(pattern: str, log: Path, proc: subprocess.Popen, timeout: float = 300) -> re.Match:
    """The first match of ``pattern`` in a running stage's log."""
    deadline = time.monotonic() + timeout
    while not (found := re.search(pattern, log.read_text())):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return found


def test_two_runs_of_one_recipe_in_two_workspaces_take_turns(project, tmp_path):
    """The train stage of one recipe in two workspaces at once (DVC_ROOT: the main one, as for a `--temp`
    copy): the second waits for the first (it says so), then finds the state trained and exports the same
    model. The lock holds across workspaces, and no state is written by two runs."""
    env = {**os.environ, "DVC_ROOT": str(tmp_path / "main"), "OMP_NUM_THREADS": "1"}
    first, second = (stage_workspace(project, tmp_path / name, steps=90, checkpoint_every=30) for name in ("a", "b"))
    procs = []
    try:
        a, a_log = start_stage(first, [sys.executable, "stages/train.py"], env)
        procs.append(a)
        while not (first / "logs" / "train_log.tsv").exists():  # written once it holds the lock
            assert a.poll() is None, a_log.read_text()
            time.sleep(0.2)
        b, b_log = start_stage(second, [sys.executable, "stages/train.py"], env)
        procs.append(b)
        wait_for(r"note: another training run holds \S+; waiting for it to finish", b_log, b)
        assert a.wait(timeout=600) == 0 and b.wait(timeout=600) == 0, b_log.read_text()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert re.search(r"checkpoint\.pt: already trained at step 90 of 90", b_log.read_text()), b_log.read_text()
    assert [p.name.rsplit("-", 1)[0] for p in (tmp_path / "main" / "checkpoints").iterdir()] == ["debias-eps"]
    models = [load_checkpoint(folder / "models" / "model.pt") for folder in (first, second)]
    assert models[0].step == models[1].step == 90
    assert all(torch.equal(models[0].model[k], models[1].model[k]) for k in models[0].model)


# two GPUs as NVML counts them before CUDA starts: those CUDA_VISIBLE_DEVICES lists, else two
SIMULATED_GPUS = """import os, runpy, sys
import torch
torch.cuda.device_count = lambda: len(os.environ.get("CUDA_VISIBLE_DEVICES", "0,1").split(","))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_concurrent_experiments_claim_disjoint_gpus(project, tmp_path):
    """DEBIAS_GPUS_PER_EXPERIMENT=1 on a node of two (simulated) GPUs: the train stages of two experiments running
    at once, each in its own workspace, claim one GPU each — never the same one — before CUDA starts; a third
    waits while both are taken and gets the GPU that the first frees when it is killed. (Without CUDA here
    each then trains on the CPU.)"""
    (tmp_path / "simulated_gpus.py").write_text(SIMULATED_GPUS)
    env = {**os.environ, "DEBIAS_GPUS_PER_EXPERIMENT": "1", "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    claimed = r"note: GPU\(s\) (\S+) claimed for this experiment"
    procs, claims = [], {}
    try:
        for weighting in ("constant", "p2", "min_snr"):
            folder = stage_workspace(project, tmp_path / weighting, weighting, steps=100000, checkpoint_every=100000,
                                     devices="auto")
            proc, log = start_stage(folder, [sys.executable, str(tmp_path / "simulated_gpus.py"), "stages/train.py"], env)
            procs.append(proc)
            if weighting != "min_snr":
                claims[weighting] = wait_for(claimed, log, proc).group(1)
        assert sorted(claims.values()) == ["0", "1"], claims
        wait_for(r"note: waiting for 1 of the GPUs 0,1 to be free", log, proc)
        assert not re.search(claimed, log.read_text())
        procs[0].kill()
        assert wait_for(claimed, log, proc, timeout=60).group(1) == claims["constant"]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
