"""The package's import structure: the runtime never imports the builder, and no two modules
of streamflow import each other, directly or around a circle (type-only and deferred imports
count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import streamflow

PACKAGE = Path(streamflow.__file__).parent
BUILDER = {"streamflow._graph", "streamflow._describe"}
RUNTIME = {
    "streamflow._runtime",
    "streamflow._runners",
    "streamflow._source_runner",
    "streamflow._loops",
    "streamflow._kinds",
    "streamflow._recovery",
    "streamflow._channel",
    "streamflow._calls",
    "streamflow._devices",
    "streamflow._message",
    "streamflow._metrics",
    "streamflow._spec",
    "streamflow._stage",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every streamflow module ``path`` imports, anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("streamflow"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("streamflow"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_runtime_module_imports_the_builder(graph: dict[str, set[str]]) -> None:
    assert set(graph) >= RUNTIME, "a runtime module was renamed: update this test"
    offenders = {m: sorted(graph[m] & BUILDER) for m in RUNTIME if graph[m] & BUILDER}
    assert not offenders


def test_no_import_circles(graph: dict[str, set[str]]) -> None:
    # the package's __init__ files re-export, so they import their children; a child that
    # imports its own package's __init__ for a public name is not a circle of concepts
    edges = {
        m: {d for d in deps if not (d == m.rpartition(".")[0] and graph.get(d) is not None)}
        for m, deps in graph.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import circle: " + " -> ".join(cycle))
