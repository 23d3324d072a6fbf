"""Packaging: every third-party module difforge imports comes from a declared dependency, and
every built-in operator is declared as an entry point under its own name."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import entry_points, packages_distributions, requires
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "difforge"


def third_party_imports() -> dict[str, str]:
    """Top-level module -> the first file importing it."""
    found: dict[str, str] = {}
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "difforge":
                    found.setdefault(top, str(path.relative_to(ROOT.parent)))
    return found


def declared() -> set[str]:
    names = set()
    for req in requires("difforge") or []:
        names.add(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_every_third_party_import_is_a_declared_dependency():
    deps, provides = declared(), packages_distributions()
    missing = {}
    for module, where in third_party_imports().items():
        dists = {d.lower().replace("_", "-") for d in provides.get(module, [])}
        if not dists & deps:
            missing[module] = (where, sorted(dists))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_built_in_operator_is_an_entry_point_under_its_name():
    eps = {ep.name: ep for ep in entry_points(group="difforge.operators")}
    modules = sorted(p for p in (ROOT / "operators").rglob("*.py") if not p.name.startswith("_"))
    defined = {}
    for path in modules:
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt in node.body:  # a class-level `name = "stage.op"`
                if (
                    isinstance(stmt, ast.Assign)
                    and [getattr(t, "id", None) for t in stmt.targets] == ["name"]
                    and isinstance(stmt.value, ast.Constant)
                ):
                    defined[stmt.value.value] = f"{module}:{node.name}"
    assert defined and {n: eps[n].value for n in defined if n in eps} == defined
    assert set(defined) <= set(eps)
