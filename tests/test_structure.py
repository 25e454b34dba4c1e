"""The runtime's structure: no import cycle inside npcam/ or export/, whether the import is at the top of a module
or inside a function (a lazy import that closes a cycle is still one). Read with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)


def imports(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` and the modules of the same package it imports (``TYPE_CHECKING`` blocks left out:
    they never run)."""
    root = REPO / package
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package_of = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()

        def visit(nodes, package_of=package_of, found=found):
            for node in nodes:
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                    continue
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package_of.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                    for alias in node.names:
                        sub = f"{target}.{alias.name}"
                        found.add(sub if sub in modules else target)
                visit(ast.iter_child_nodes(node))

        visit(ast.parse(Path(path).read_text(encoding="utf-8")).body)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start)):
            return found
    return None


@pytest.mark.parametrize("package", ["npcam", "export"])
def test_no_import_cycle(package):
    found = cycle(imports(package))
    assert found is None, "an import cycle: " + " -> ".join(found)


def test_the_checker_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
