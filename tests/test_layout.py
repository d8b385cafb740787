"""The code base's shape: DVC deps that cannot go stale, small modules, a layered import graph
without cycles, and references (file paths, ``debias.…`` names) that exist."""

import ast
import importlib
import re
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from debias import catalog

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "debias"
MAX_LINES = 350

# a module may import modules of its own layer or a lower one, never a higher one
LAYERS = [
    {"debias", "debias.errors", "debias.io", "debias.schema", "debias.npz", "debias.catalog", "debias.progress",
     "debias.config", "debias.seeds", "debias.limits", "debias.locks"},  # the ground floor: configuration imports no implementation
    {"debias.diffusion", "debias.gpus", "debias.runtime", "debias.images", "debias.figures", "debias.phema", "debias.pipeline",
     "debias.stopping"},
    {"debias.models", "debias.models.layers", "debias.models.unet", "debias.solvers", "debias.checkpoints",
     "debias.data", "debias.metrics", "debias.posthoc"},
    {"debias.models.factory", "debias.sampling", "debias.streaming", "debias.sources", "debias.convert",
     "debias.train", "debias.analysis", "debias.report", "debias.comparison"},
    {"debias.jobs"},
    {"debias.cli", "debias.__main__"},
]
# the modules the solver registry imports by name when a solver runs (debias.solvers.solver_function): dvc.yaml
# names each through a template, solvers/${...}.py, so that it is a dependency of its own stages alone
SOLVER_TEMPLATES = ("${item.solver}", "${analyze.color_solver}", "${analyze.fid_solver}")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    """The file of module ``debias.…`` (a package's __init__.py), or None if it is not a module."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def direct_imports(path: Path) -> set[str]:
    """The debias modules a file imports (anywhere in it: top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if module_path(f"{node.module}.{alias.name}") else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] == "debias"}
    return found


def with_parents(name: str) -> set[str]:
    """A module and the packages above it, whose __init__ runs first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_closure(script: Path) -> set[Path]:
    """Every file of src/debias that running ``script`` can execute, through imports at any depth."""
    seen, todo = set(), set().union(*(with_parents(m) for m in direct_imports(script)))
    while todo:
        name = todo.pop()
        path = module_path(name)
        assert path is not None, f"{script}: cannot resolve import {name}"
        if path in seen:
            continue
        seen.add(path)
        for imported in direct_imports(path):
            todo |= with_parents(imported) - {module_name(p) for p in seen}
    return seen


def solver_module(name: str) -> Path:
    """The file of the module that implements solver ``name``."""
    from debias.solvers import SOLVERS

    return PACKAGE / "solvers" / f"{SOLVERS[name].module}.py"


def stage_deps(stage: dict) -> set[Path]:
    """The library files a dvc.yaml stage lists (folders expanded to their .py files; solver templates apart)."""
    files = set()
    for dep in stage.get("deps", []):
        path = REPO / dep
        if not str(dep).startswith("src/") or "${" in str(dep):
            continue
        assert path.exists(), f"dvc.yaml lists {dep}, which does not exist"
        files |= set(path.rglob("*.py")) if path.is_dir() else {path}
    return files


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_are_exactly_the_import_closure_of_its_script(name):
    """Editing any module a stage runs reruns it, and editing any other module does not."""
    stage = STAGES[name]
    script = REPO / stage["cmd"].split()[1]
    assert str(script.relative_to(REPO)) in stage["deps"], f"{name} does not depend on its own script"
    closure, listed = import_closure(script), stage_deps(stage)
    solver_files = {solver_module(name) for name in catalog.SOLVERS}
    assert not closure & solver_files, f"{name} imports a solver's module, which the registry imports by name"
    for dep in (d for d in stage["deps"] if any(t in d for t in SOLVER_TEMPLATES) and d.startswith("src/")):
        template = next(t for t in SOLVER_TEMPLATES if t in dep)
        for solver in catalog.SOLVERS:
            path = REPO / dep.replace(template, solver)
            assert path.resolve() == solver_module(solver).resolve(), f"{dep} for {solver} is not its module"
            closure |= import_closure(solver_module(solver)) - {solver_module(solver)}
    missing = sorted(str(p.relative_to(REPO)) for p in closure - listed)
    extra = sorted(str(p.relative_to(REPO)) for p in listed - closure)
    assert not missing, f"stage {name} runs but does not list: {missing}"
    assert not extra, f"stage {name} lists modules it never imports: {extra}"


def test_report_code_is_not_a_dependency_of_training():
    deps = stage_deps(STAGES["train"])
    assert not deps & {PACKAGE / "report.py", PACKAGE / "figures.py", PACKAGE / "analysis.py"}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if not p.is_symlink())  # solvers/dpmsolver++.py links dpmsolver.py


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def layer_of(name: str) -> int:
    """The layer of a module: its own entry, else its package's (below the root package)."""
    for candidate in sorted(with_parents(name) - ({"debias"} - {name}), key=len, reverse=True):
        for rank, members in enumerate(LAYERS):
            if candidate in members:
                return rank
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py")


def test_imports_never_go_up_a_layer():
    upward = []
    for path in MODULES:
        name = module_name(path)
        for imported in direct_imports(path):
            if layer_of(imported) > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {imported} (layer {layer_of(imported)})")
    assert not upward, upward


def test_import_graph_has_no_cycles():
    graph = defaultdict(set)
    for path in MODULES:
        graph[module_name(path)] = direct_imports(path)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        assert state.get(name) != 1, f"import cycle: {' → '.join(trail + [name])}"
        state[name] = 1
        for imported in sorted(graph[name]):
            visit(imported, trail + [name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])


TEXT_FILES = [p for pattern in ("src/**/*.py", "stages/*.py", "tests/*.py", "benchmarks/*", "docs/**/*.md",
                                "README.md", "dvc.yaml", "params.yaml", ".ci/run")
              for p in REPO.glob(pattern) if p.is_file() and p.suffix != ".png"]
REPO_PATH = re.compile(r"(?<![\w./-])((?:src|tests|benchmarks|stages|docs|configs|\.ci)/[\w./-]*[\w/])")
DOTTED = re.compile(r"`~?(debias(?:\.\w+)+)`")


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_references_point_at_things_in_this_repository(path):
    text = path.read_text()
    design = "DESIGN" + ".md"  # the plan lives outside the repository
    assert design not in text, f"{design} is not part of this repository"
    missing = [ref for ref in REPO_PATH.findall(text)
               if not (REPO / ref.split("::")[0]).exists() and "*" not in ref and "<" not in ref]
    assert not missing, f"{path.name} cites files that do not exist: {missing}"
    unresolved = [ref for ref in DOTTED.findall(text) if not resolves(ref)]
    assert not unresolved, f"{path.name} names things that do not exist: {unresolved}"
