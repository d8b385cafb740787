"""The real pipeline: `dvc repro` and `dvc exp run -S weighting=...` on a micro configuration in a
temporary git repository (seconds of training, a handful of samples)."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from debias.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvc/config", ".dvc/plots", ".dvcignore", "stages", ".gitignore"]

MICRO = {
    "data": {"max_images": 48},
    "model": {"channel_mult": [1], "attention_resolutions": [], "num_res_blocks": 1},
    "diffusion": {"steps": 50},
    "train": {"steps": 12, "batch_size": 16, "checkpoint_every": 6, "snapshot_steps": [6, 12], "log_every": 3,
              "warmup_steps": 2},
    # 9 samples: not divisible by two processes, the chunk size or the batch size
    "sample": {"num_samples": 9, "batch_size": 4, "chunk_size": 4, "steps": [2, 4], "solvers": ["ddim", "unipc"]},
    "eval": {"kid_subset_size": 4, "reference_images": 8, "batch_size": 4, "bootstrap": 20},
    "analyze": {"num_images": 8, "timesteps": 3, "color_steps": [2, 3], "color_samples": 4, "fid_samples": 4,
                "fid_steps": 2},
}

pytestmark = pytest.mark.slow


def run(args, cwd, check=True, threads=None):
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def dvc(*args, cwd, check=True):
    return run([sys.executable, "-m", "dvc", *args], cwd, check)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    # the stages depend on the library sources: give the copy its own (identical) tree
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in MICRO.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "micro project"], root)
    dvc("repro", cwd=root)
    return root


def test_repro_produces_every_declared_output(project):
    for solver in ("ddim", "unipc"):
        metrics = json.loads((project / "metrics" / f"{solver}.json").read_text())[solver]
        assert set(metrics) == {"fid", "sfid", "kid", "precision", "recall"} and metrics["fid"] > 0
        steps = [line.split("\t") for line in (project / "metrics" / f"{solver}_vs_steps.tsv").read_text().splitlines()]
        assert [row[0] for row in steps] == ["steps", "2", "4"]
        assert dict(zip(steps[0], steps[1]))["fid"] == repr(metrics["fid"])  # the headline: the first of sample.steps
        assert {"fid_low", "fid_high", "sfid_low", "sfid_high", "kid_low", "kid_high"} <= set(steps[0])
        intervals = json.loads((project / "metrics" / f"{solver}.intervals.json").read_text())
        assert set(intervals) == {"2", "4"} and set(intervals["2"]) == {"fid", "sfid", "kid"}
        assert intervals["2"]["fid"]["estimate"] == pytest.approx(metrics["fid"], rel=1e-6)
        assert intervals["2"]["fid"]["replicates"] == MICRO["eval"]["bootstrap"] and intervals["2"]["kid"]["std"] > 0
        provenance = json.loads((project / "metrics" / f"{solver}.provenance.json").read_text())
        assert provenance["extractor"] == "inception-v3-compat" and provenance["headline_steps"] == 2
        assert len(provenance["weights_sha256"]) == 64
        assert (project / "samples" / solver / "steps_4.npz").is_file()
        assert (project / "reports" / f"grid_{solver}.png").is_file()
    for name in ("x0_bias.tsv", "color_shift.tsv", "fid_vs_train.tsv", "figures/x0_bias.png", "figures/color_grid.png"):
        assert (project / "plots" / name).is_file(), name
    assert (project / "models" / "model.pt").is_file()
    assert sorted(p.name for p in (project / "models" / "snapshots").iterdir()) == ["step_0000006.pt", "step_0000012.pt"]
    report = (project / "reports" / "report.md").read_text()
    assert "| ddim | 2 |" in report and "debias" in report
    shown = dvc("metrics", "show", "--json", cwd=project).stdout
    assert "metrics/unipc.json" in shown


def test_second_repro_is_a_no_op_and_steps_change_reruns_only_downstream(project):
    out = dvc("repro", cwd=project).stdout
    assert "Running stage" not in out
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sample"]["steps"] = [2, 3]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = dvc("repro", "--dry", cwd=project).stdout
    would_run = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
    assert would_run == {"sample@ddim", "sample@unipc", "evaluate@ddim", "evaluate@unipc", "report"}
    params["sample"]["steps"] = [2, 4]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# which stages execute a module: editing it must invalidate exactly these (micro project: solvers ddim and unipc,
# analyze.color_solver and fid_solver ddim)
EDITS = {
    "solvers/unipc.py": {"sample@unipc"},
    "solvers/ddim.py": {"sample@ddim", "analyze"},
    "metrics/scores.py": {"evaluate@ddim", "evaluate@unipc", "analyze"},
    "train/loop.py": {"train"},
    "diffusion/densities.py": {"train"},
    "posthoc.py": {"sample@ddim", "sample@unipc"},
    "report.py": {"report"},
    "models/unet.py": {"train", "sample@ddim", "sample@unipc", "analyze"},
    "metrics/inception.py": {"prepare", "evaluate@ddim", "evaluate@unipc", "analyze"},
}


def test_an_edit_invalidates_only_the_stages_that_execute_it(project):
    """DVC's promise: recompute what changed. A comment appended to a module makes `dvc status` report
    exactly the stages that run it (a solver edit never reaches prepare, train or evaluate@*)."""
    assert json.loads(dvc("status", "--json", cwd=project).stdout) == {}
    for module, expected in EDITS.items():
        path = project / "src" / "debias" / module
        text = path.read_text()
        path.write_text(text + "# an edit\n")
        try:
            changed = set(json.loads(dvc("status", "--json", cwd=project).stdout))
        finally:
            path.write_text(text)
        assert changed == expected, module
    assert json.loads(dvc("status", "--json", cwd=project).stdout) == {}


def test_the_cli_runs_the_stages_jobs(project, tmp_path):
    """`debias sample`, `debias fid` and `debias analyze` on the project's params give what sample@ddim,
    evaluate@ddim and analyze wrote: the same samples (bytes), metrics and intervals (keys and values) and tables."""
    from debias.jobs.evaluate import interval_columns

    debias = [sys.executable, "-m", "debias"]
    run([*debias, "sample", "models/model.pt", "--solver", "ddim", "--steps", "2", "--out", str(tmp_path / "s.npz")],
        project)
    assert (tmp_path / "s.npz").read_bytes() == (project / "samples" / "ddim" / "steps_2.npz").read_bytes()
    run([*debias, "fid", "samples/ddim/steps_2.npz", "--out", str(tmp_path / "fid.json")], project)
    scored = json.loads((tmp_path / "fid.json").read_text())
    provenance, intervals = scored.pop("provenance"), scored.pop("intervals")
    assert intervals == json.loads((project / "metrics" / "ddim.intervals.json").read_text())["2"]
    staged = dict(zip(*[line.split("\t") for line in (project / "metrics" / "ddim_vs_steps.tsv").read_text().splitlines()[:2]]))
    assert set(scored) == set(staged) - {"steps", "seconds"} - set(interval_columns(intervals))
    assert {key: repr(value) for key, value in scored.items()} == {key: staged[key] for key in scored}
    headline = json.loads((project / "metrics" / "ddim.json").read_text())["ddim"]
    assert {key: scored[key] for key in headline} == headline
    assert provenance["weights_sha256"] == json.loads((project / "metrics" / "ddim.provenance.json").read_text())["weights_sha256"]
    run([*debias, "analyze", "models/model.pt", "--out-dir", str(tmp_path / "analysis")], project)
    for table in ("x0_bias.tsv", "color_shift.tsv"):
        assert (tmp_path / "analysis" / table).read_text() == (project / "plots" / table).read_text(), table


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]




def test_stages_under_torchrun_equal_one_process(project):
    """prepare (its reference features), sample@ddim, evaluate@ddim and analyze under torchrun (2 gloo
    processes) write bitwise the files of one process (one thread each, as torchrun gives its processes)."""
    stages = [["prepare.py"], ["sample.py", "ddim"], ["evaluate.py", "ddim"], ["analyze.py"]]
    exact = [project / "data" / "reference_features.npz", *[project / "samples" / "ddim" / f"steps_{n}.npz" for n in (2, 4)],
             project / "metrics" / "ddim_vs_steps.tsv", *[project / "plots" / f"{name}.tsv" for name in
                                                          ("x0_bias", "color_shift", "fid_vs_train")]]
    metrics = project / "metrics" / "ddim.json"
    kept = {path: path.read_bytes() for path in [*exact, metrics, project / "metrics" / "ddim.provenance.json",
                                                 *(project / "plots" / "figures").iterdir()]}
    results = []
    for launcher in ([sys.executable], TORCHRUN):
        for stage in stages:
            run([*launcher, f"stages/{stage[0]}", *stage[1:]], project, threads=1)
        results.append(([path.read_bytes() if path.suffix == ".npz" else without_seconds_tsv(path) for path in exact],
                        json.loads(metrics.read_text())))
    assert results[1] == results[0]
    assert results[0][0][1:3] == [kept[path] for path in exact[1:3]]  # the samples are what `dvc repro` wrote
    for path, data in kept.items():
        path.write_bytes(data)
    # the train stage under a torchrun started by hand: rank 0 alone takes the recipe's lock (the others must not
    # wait for it), and the finished state is re-exported unchanged
    model = (project / "models" / "model.pt").read_bytes()
    run([*TORCHRUN, "stages/train.py"], project, threads=1)
    assert (project / "models" / "model.pt").read_bytes() == model
    assert "Running stage" not in dvc("repro", "--dry", cwd=project).stdout


def without_seconds_tsv(path: Path) -> list[list[str]]:
    """A TSV's rows without its wall-clock columns."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if "seconds" not in name]
    return [[row[i] for i in keep] for row in rows]


def test_sigkill_of_the_sample_stage_resumes_with_only_the_missing_chunks(project, tmp_path):
    """The sample stage killed at random moments: every rerun samples exactly the chunks that are
    missing (of every step count: the finished ones keep theirs until the stage ends), and the last
    writes bitwise what an uninterrupted run writes."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sample"].update(num_samples=150, batch_size=10, chunk_size=10, steps=[2, 5])
    runs = {}
    for name in ("reference", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(project / "stages", runs[name] / "stages")
        (runs[name] / "models").mkdir()
        shutil.copy(project / "models" / "model.pt", runs[name] / "models")
        (runs[name] / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    began = time.monotonic()
    run([sys.executable, "stages/sample.py", "ddim"], runs["reference"], threads=1)
    span = time.monotonic() - began
    folder = runs["killed"]
    everything = {f"{a:08d}-{min(a + 10, 150):08d}.npz" for a in range(0, 150, 10)}
    line = re.compile(r"samples/ddim/steps_(\d+)\.npz: (\d+) of 15 chunks already sampled; sampling (.*)$", re.M)
    rng, resumed = random.Random(1), 0
    for attempt in range(8):
        before = {n: {p.name for p in (folder / "chunks" / "ddim" / f"steps_{n}").glob("*.npz")} for n in (2, 5)}
        proc = subprocess.Popen([sys.executable, "stages/sample.py", "ddim"], cwd=folder, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            _, log = proc.communicate(timeout=rng.uniform(0.3, 0.95) * span if attempt < 7 else 300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            _, log = proc.communicate()
        for steps, found, sampling in line.findall(log):
            assert int(found) == len(before[int(steps)]), log
            missing = everything - before[int(steps)]
            assert (set() if sampling == "none" else {f"{int(a):08d}-{int(b):08d}.npz" for a, b in
                                                      (r.split("-") for r in sampling.split(", "))}) == missing
            resumed += 1
        if proc.returncode == 0:
            break
    assert proc.returncode == 0 and resumed >= 1, "no kill landed mid-way"
    for n in (2, 5):
        name = Path("samples") / "ddim" / f"steps_{n}.npz"
        assert (folder / name).read_bytes() == (runs["reference"] / name).read_bytes()
        assert [p.name for p in (folder / "chunks" / "ddim" / f"steps_{n}").iterdir()] == ["settings.json"]


def test_experiment_with_another_weighting(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline run"], project)
    dvc("exp", "run", "-S", "weighting=p2", "-n", "p2-run", cwd=project)
    table = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    from debias.comparison import experiments_from_exp_show

    experiments = {e["name"]: e for e in experiments_from_exp_show(table)}
    assert "p2-run" in experiments
    assert experiments["p2-run"]["params"]["weighting"] == "p2"
    assert experiments["p2-run"]["metrics"]["metrics/ddim.json"]["ddim"]["fid"] > 0


# ----------------------------------------------------------------------------- DVC and CLI conventions

def test_exp_show_has_few_metric_columns_and_the_training_metrics(project):
    table = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    metrics = table[0]["data"]["metrics"]
    columns = [(path, key) for path, entry in metrics.items() for key in pd_flat(entry["data"])]
    assert len(columns) <= 25, columns
    assert {key for path, key in columns if path == "logs/dvclive/metrics.json"} == {"step", "loss", "mse",
                                                                                    "images_per_s"}
    assert metrics["logs/dvclive/metrics.json"]["data"]["step"] == MICRO["train"]["steps"]
    assert {key for path, key in columns if path == "metrics/ddim.json"} == {
        "ddim.fid", "ddim.sfid", "ddim.kid", "ddim.precision", "ddim.recall"}


def pd_flat(d: dict, prefix: str = "") -> list[str]:
    """The column names DVC makes of a nested metrics dict."""
    return [name for key, value in d.items()
            for name in (pd_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# no network: every host name fails to resolve and any proxied request goes nowhere
OFFLINE_BROWSER = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--hide-scrollbars", "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
                   "--virtual-time-budget=20000", "--window-size=900,3200"]
# appended to a copy of the page: after drawing, record where each plot is and whether it holds a drawing
PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const boxes = [...document.querySelectorAll("body > div[id]")].map(div => {
    const r = div.getBoundingClientRect();
    return {id: div.id, drawn: div.querySelectorAll("canvas, svg").length,
            x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height};
  });
  const pre = document.createElement("pre");
  pre.id = "probe"; pre.style.display = "none"; pre.textContent = JSON.stringify(boxes);
  document.body.appendChild(pre);
}, 2000));
</script>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium; .ci/run installs it)")
def test_dvc_plots_show_draws_every_declared_plot_offline_in_chromium(project, tmp_path):
    """`dvc plots show` writes a page that draws each of dvc.yaml's plots with no network: each plot's
    area in a headless Chromium screenshot holds axes and a coloured data line."""
    from PIL import Image

    dvc("plots", "show", "-o", str(tmp_path / "html"), cwd=project)
    page = (tmp_path / "html" / "index.html").read_text()
    assert "<script src" not in page.replace(" ", "").lower().replace("<scriptsrc", "<script src")
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["plots"]
    probe = tmp_path / "html" / "probe.html"
    end = page.rfind("</body>")
    probe.write_text(page[:end] + PROBE + page[end:])
    dom = run([*OFFLINE_BROWSER, "--dump-dom", probe.as_uri()], tmp_path).stdout
    boxes = json.loads(re.search(r'<pre id="probe"[^>]*>(.*?)</pre>', dom, re.S).group(1))
    assert len(boxes) == len(declared), boxes
    assert all(box["drawn"] and box["h"] > 100 for box in boxes), boxes
    run([*OFFLINE_BROWSER, f"--screenshot={tmp_path / 'page.png'}", probe.as_uri()], tmp_path)
    shot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB")).astype(int)
    for box in boxes:
        x, y, w, h = (int(box[k]) for k in ("x", "y", "w", "h"))
        area = shot[y:y + h, x:x + w]
        inked = (area.min(axis=2) < 200).mean()  # axes, ticks, labels
        coloured = ((area.max(axis=2) - area.min(axis=2)) > 60).sum()  # the data line (one colour per revision)
        assert inked > 0.01 and coloured > 50, (box["id"], inked, coloured)


README = REPO / "README.md"
RECIPES_PAGE = REPO / "docs" / "recipes.md"
# README commands that need what a test cannot have: a released 256x256 checkpoint, a GPU
NEEDS_OUTSIDE = ("ema_0.9999_", "VIRTUAL_", "--device cuda", "celebahq")
# the micro project samples 2 and 4 steps, not the default's 20
MICRO_NAMES = {"steps_20.npz": "steps_4.npz"}
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


def test_another_recipe_never_erases_a_training_state(project):
    """`dvc exp run -S weighting=constant` trains into its own state; after `dvc exp apply` of the
    baseline, `dvc repro` re-exports the baseline without training and a longer run resumes it."""
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline for the recipe-state test", "--allow-empty"], project)
    dvc("exp", "run", "-n", "state-baseline", cwd=project)
    states = project / "checkpoints"
    before = {p.name: (p / "checkpoint.pt").read_bytes() for p in states.iterdir()}
    model = (project / "models" / "model.pt").read_bytes()
    dvc("exp", "run", "-n", "state-constant", "-S", "weighting=constant", cwd=project)
    after = {p.name: (p / "checkpoint.pt").read_bytes() for p in states.iterdir()}
    assert set(before) < set(after) and all(after[name] == data for name, data in before.items())
    dvc("exp", "apply", "state-baseline", cwd=project)
    repro = dvc("repro", cwd=project)
    assert "Running stage 'train'" not in repro.stdout or "already trained" in repro.stdout + repro.stderr
    assert (project / "models" / "model.pt").read_bytes() == model
    log = (project / "logs" / "train_log.tsv").read_text()
    longer = dvc("exp", "run", "-n", "state-longer", "-S", f"train.steps={MICRO['train']['steps'] + 6}", cwd=project)
    assert f"resuming at step {MICRO['train']['steps']}" in longer.stdout + longer.stderr
    resumed = (project / "logs" / "train_log.tsv").read_text()
    assert resumed.startswith(log) and len(resumed.splitlines()) == len(log.splitlines()) + 2


def micro_copy(project: Path, folder: Path, **params) -> Path:
    """A copy of the micro project at its micro params (earlier tests leave other values) plus ``params``, with
    no training state, committed."""
    shutil.copytree(project, folder, symlinks=True)
    shutil.rmtree(folder / "checkpoints")
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
