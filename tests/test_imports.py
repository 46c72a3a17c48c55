"""The package's module-level import graph: no cycles; the layers below the stages never reach up
into them, nor into the job runtime; the stages never import `ctprune.run` (which is built on
them); and the experiment's graph (`ctprune.run.graph`) built from the spec, the jobs and the
executors (it holds no stage logic of its own)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ctprune"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports() -> dict[str, set[str]]:
    """ctprune module -> the ctprune modules it imports at module level (not inside functions)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctprune"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("ctprune")]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def imports_anywhere(path: Path) -> set[str]:
    """The ctprune modules a file imports anywhere, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctprune"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ctprune")}
    return found


UPPER = ("ctprune.stages", "ctprune.cli")  # the commands and their stage functions
RUN = "ctprune.run"  # the job runtime and bodies, executors, experiment graph and report: built on the stages
# What the stages are built on: it never reaches up into them, not even from inside a function
# (the budget grammar once lived in the search stage and the spec imported it from there).
BELOW = ("ctprune.spec", "ctprune.budget", "ctprune.errors", "ctprune.fileio", "ctprune.run.experiment",
         "ctprune.run.protocol", "ctprune.arch", "ctprune.data", "ctprune.model", "ctprune.pruning", "ctprune.training")


def test_nothing_outside_the_cli_the_stages_and_run_imports_them_at_import_time() -> None:
    upward = {name: sorted(d for d in deps if _within(d, UPPER)) for name, deps in module_imports().items()
              if not _within(name, UPPER + (RUN,)) and name != "ctprune.__main__"}
    assert not {name: deps for name, deps in upward.items() if deps}


def test_the_layers_below_the_stages_never_import_a_stage_or_the_cli() -> None:
    below = [p for p in ROOT.rglob("*.py") if _within(_module(p), BELOW)]
    assert any(_module(p) == "ctprune.spec" for p in below)
    upward = {_module(p): sorted(d for d in imports_anywhere(p) if _within(d, UPPER + ("ctprune.run.jobs",
                                                                                   "ctprune.run.executors",
                                                                                   "ctprune.run.graph",
                                                                                   "ctprune.run.report")))
              for p in below}
    assert not {name: deps for name, deps in upward.items() if deps}


def test_the_stages_never_import_run() -> None:
    stages = [p for p in ROOT.rglob("*.py") if _within(_module(p), ("ctprune.stages",))]
    assert any(_module(p) == "ctprune.stages.finetune" for p in stages)
    upward = {_module(p): sorted(d for d in imports_anywhere(p) if _within(d, (RUN,))) for p in stages}
    assert not {name: deps for name, deps in upward.items() if deps}


def test_no_import_cycles() -> None:
    graph = module_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_graph_imports_the_experiment_the_runtime_and_the_executors() -> None:
    deps = module_imports()["ctprune.run.graph"]
    assert {"ctprune.run.experiment", "ctprune.run.runtime", "ctprune.run.executors"} <= deps
    stages = {d for d in deps if d.startswith("ctprune.stages") or d.startswith("ctprune.model")
              or d.startswith("ctprune.training")}
    assert not stages, stages  # stage logic lives in the jobs, not in the graph


def test_nothing_of_run_imports_the_job_bodies() -> None:
    """The job runtime, the executors and the graph name job functions; only a worker running a
    job imports ``ctprune.run.jobs`` (by the name the job carries), not even inside a function."""
    for name in ("runtime", "executors", "graph", "experiment", "protocol", "summary", "report"):
        found = imports_anywhere(ROOT / "run" / f"{name}.py")
        assert not {m for m in found if _within(m, ("ctprune.run.jobs",))}, name


def test_the_spec_and_the_history_reader_load_without_torch() -> None:
    """The experiment spec and the history reader (the bank, the report and the experiment graph
    read histories) import nothing of torch or the training loop."""
    import subprocess
    import sys

    code = "import sys, ctprune.spec, ctprune.training.history; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, check=True)
    assert r.stdout.strip() == "False"


def test_the_model_package_never_imports_pruning() -> None:
    """``ctprune.pruning`` is built on ``ctprune.model`` (masks and their weights files live in
    ``ctprune.model.weights``), not the reverse, not even from inside a function."""
    model = ROOT / "model"
    upward = {str(p.relative_to(ROOT)): sorted(d for d in imports_anywhere(p) if _within(d, ("ctprune.pruning",)))
              for p in model.rglob("*.py")}
    assert not any(upward.values()), upward
