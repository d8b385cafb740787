"""The real pipeline: `dvc repro` on a micro configuration in a temporary git repository (seconds of training, a
handful of samples): its outputs, what an edit reruns, the CLI's jobs, torchrun, a killed stage, DVC's
conventions (experiments, sweeps and the README's commands: tests/test_experiments.py)."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from micro_project import MICRO, dvc, run
from processes import chunk_names, kill_at_chunks

pytestmark = pytest.mark.slow


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
    processes) write bitwise the files that `dvc repro` wrote in one process (one thread each, as torchrun gives
    its processes: tests/micro_project.py)."""
    stages = [["prepare.py"], ["sample.py", "ddim"], ["evaluate.py", "ddim"], ["analyze.py"]]
    exact = [project / "data" / "reference_features.npz", *[project / "samples" / "ddim" / f"steps_{n}.npz" for n in (2, 4)],
             project / "metrics" / "ddim_vs_steps.tsv", *[project / "plots" / f"{name}.tsv" for name in
                                                          ("x0_bias", "color_shift", "fid_vs_train")]]
    metrics = project / "metrics" / "ddim.json"
    kept = {path: path.read_bytes() for path in [*exact, metrics, *(project / "metrics").glob("ddim.*.json"),
                                                 *(project / "plots" / "figures").iterdir()]}
    assert json.loads(dvc("status", "--json", cwd=project).stdout) == {}  # the files are those of `dvc repro`

    def written() -> tuple[list, dict]:
        return ([path.read_bytes() if path.suffix == ".npz" else without_seconds_tsv(path) for path in exact],
                json.loads(metrics.read_text()))

    one_process = written()
    for stage in stages:
        run([*TORCHRUN, f"stages/{stage[0]}", *stage[1:]], project)
    assert written() == one_process
    for path, data in kept.items():
        path.write_bytes(data)
    # the train stage under a torchrun started by hand: rank 0 alone takes the recipe's lock (the others must not
    # wait for it), and the finished state is re-exported unchanged
    model = (project / "models" / "model.pt").read_bytes()
    run([*TORCHRUN, "stages/train.py"], project)
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
    run([sys.executable, "stages/sample.py", "ddim"], runs["reference"])
    folder = runs["killed"]
    everything = {f"{a:08d}-{min(a + 10, 150):08d}.npz" for a in range(0, 150, 10)}
    line = re.compile(r"samples/ddim/steps_(\d+)\.npz: (\d+) of 15 chunks already sampled; sampling (.*)$", re.M)
    chunks = {n: folder / "chunks" / "ddim" / f"steps_{n}" for n in (2, 5)}
    rng, resumed = random.Random(1), 0
    for _ in range(31):
        before = {n: chunk_names(chunks[n]) for n in (2, 5)}
        with (tmp_path / "stage.log").open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "stages/sample.py", "ddim"], cwd=folder, stdout=subprocess.DEVNULL,
                                    stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
            target = sum(map(len, before.values())) + rng.randint(1, 8)  # 30 chunks in all: from there on to the end
            if target < 30:
                kill_at_chunks(proc, list(chunks.values()), target)
            proc.wait(timeout=300)
        log = (tmp_path / "stage.log").read_text()
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
