"""The package's import graph, drawn from the code (every import, at module level or inside a
function): the engine never imports an operator, and no module imports itself in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def import_graph() -> dict[str, set[str]]:
    """difforge module -> the difforge modules it imports."""
    files = {}
    for path in (ROOT / "difforge").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("difforge") else None
                if target and target != module:
                    deps.add(target)
        graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_engine_never_imports_an_operator():
    graph = import_graph()
    engine = [m for m in graph if m.startswith(("difforge.platform", "difforge.jobs"))]
    bad = {m: sorted(d for d in graph[m] if d.startswith("difforge.operators")) for m in engine}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_engine_has_no_import_cycles():
    engine_cycles = [c for c in cycles(import_graph()) if not c[0].startswith("difforge.operators")]
    assert engine_cycles == []


def test_operators_never_import_one_another():
    graph = import_graph()
    bad = {}
    for module, deps in graph.items():
        if module.startswith("difforge.operators."):
            family = module.split(".")[2]
            others = [
                d for d in deps if d.startswith("difforge.operators.") and d.split(".")[2] != family
            ]
            if others:
                bad[module] = sorted(others)
    assert bad == {}
    assert cycles(graph) == []


def test_no_function_of_the_engine_is_longer_than_60_lines():
    """The engine's core stays readable: every function of difforge/platform/ fits on a screen
    (the issue that split `build_plan`, 209 lines, into passes set the bound)."""
    long = []
    for path in sorted((ROOT / "difforge" / "platform").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
