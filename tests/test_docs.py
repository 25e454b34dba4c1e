"""The docs hold what the code is: docs/architecture.md's module map names every module, and no module that is gone."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

pytestmark = pytest.mark.fast  # the runtime alone: in the fast tier (pytest --fast)

ARCHITECTURE = REPO / "docs" / "architecture.md"


def module_map() -> str:
    """The first code block after the "Module map" heading."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    after = text[text.index("## Module map") :]
    return after.split("```")[1]


def mapped_paths(block: str) -> set[str]:
    """The paths the indented tree names: a line whose first word ends in ``/`` or ``.py`` is an entry, its
    indentation (two spaces a level) its depth; other lines continue the entry above."""
    stack: list[str] = []
    paths = set()
    for line in block.splitlines():
        match = re.match(r"^( *)([\w.]+(?:/|\.py))(?:\s|$)", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        stack = stack[:depth] + [match.group(2)]
        if stack[-1].endswith(".py"):
            paths.add("".join(stack))
    return paths


def test_every_module_is_named_in_the_module_map_and_none_is_stale():
    named = {path for path in mapped_paths(module_map()) if path.startswith(("npcam/", "export/"))}
    modules = {
        str(path.relative_to(REPO))
        for folder in ("npcam", "export")
        for path in (REPO / folder).rglob("*.py")
        if path.name != "__init__.py"
    }
    assert not modules - named, f"modules missing from docs/architecture.md's module map: {sorted(modules - named)}"
    assert not named - modules, f"the module map names modules that do not exist: {sorted(named - modules)}"


def test_every_script_is_named_in_the_module_map():
    block = module_map()
    scripts = {path.name for path in (REPO / "scripts").iterdir() if path.suffix in (".py", ".sh")}
    missing = sorted(name for name in scripts if not re.search(rf"\b{re.escape(name)}\b", block))
    assert not missing, f"scripts missing from docs/architecture.md's module map: {missing}"
