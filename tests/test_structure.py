"""The shape of the library: no import cycle in ``pipeline/``, no module over 400 lines,
and ``pipeline/`` never reaches up into ``stages/`` or ``report/``.

Imports are read from the source with ``ast`` (every ``import`` / ``from ... import`` at any
depth, including those inside functions), so a cycle hidden in a lazy import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The ``pipeline`` modules ``path`` imports (a name resolves to the longest known module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in known:
                    found.add(candidate)
                    break
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        # A package's own __init__ re-exporting its submodules is not an edge back to it.
        graph[name] = {m for m in _imports(path, known) if m != name and not name.startswith(f"{m}.")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_known_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_sees_real_edges() -> None:
    graph = _graph()
    assert "pipeline.rd.entropy" in graph["pipeline.rd.ibm"]
    assert "pipeline.train.targets" in graph["pipeline.train.objective"]


def test_no_import_cycle_in_pipeline() -> None:
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle in pipeline/: " + " -> ".join(cycle or [])


def test_pipeline_never_imports_stages_or_report() -> None:
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [m for m in mods if m.split(".")[0] in ("stages", "report", "click")]
            assert not bad, f"{name} imports {bad}: the library must not depend on stages, reporting or the CLI"


def test_data_and_rd_know_nothing_of_cache_or_train() -> None:
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith(("pipeline.data", "pipeline.rd")):
            bad = sorted(d for d in deps if d.startswith(("pipeline.cache", "pipeline.train")))
            assert not bad, f"{name} imports {bad}"


def test_no_pipeline_module_over_400_lines() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines (one concept per module): {long}"


def _stage_closure(stage_file: Path, graph: dict[str, set[str]], known: set[str]) -> set[str]:
    """Every ``pipeline`` module a stage script reaches through its imports."""
    todo, seen = list(_imports(stage_file, known)), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def test_every_stage_depends_on_the_library_code_it_runs() -> None:
    """A change to any ``pipeline`` module a stage imports (directly or through other
    modules) must rerun that stage under ``dvc repro``: its file or folder is a dependency."""
    import yaml

    modules = _modules()
    graph, known = _graph(), set(modules)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        deps = [d.rstrip("/") for d in stage.get("do", stage).get("deps", [])]
        for module in _stage_closure(ROOT / "stages" / f"{name}.py", graph, known):
            path = modules[module].relative_to(ROOT).as_posix()
            if modules[module].stat().st_size == 0:  # an empty package __init__
                continue
            if not any(path == d or path.startswith(f"{d}/") for d in deps):
                missing.setdefault(name, []).append(path)
    assert not missing, f"dvc.yaml stages miss these dependencies: {missing}"
