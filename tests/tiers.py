"""Which test tier a test belongs to, read from the code it would run.

A test is in the *fast* tier when everything it can import is the runtime
(:data:`RUNTIME`) or the standard library. "Everything" is found statically,
with :mod:`ast`, never by importing anything:

- the imports at the top of its file, and of the test modules it imports;
- the imports inside the test function, and inside every function and class of
  ``tests/`` that it names (``from conftest import random_resnet`` follows into
  ``random_resnet``), transitively;
- the same for every fixture in its fixture closure that is defined in ``tests/``
  (``cli`` needs ``bundle``, which imports ``export``, so ``cli`` is not fast);
- modules named in ``pytest.importorskip("...")`` calls.

A test that touches :data:`SLOW` (Ray, Chromium through Selenium) is marked
``slow`` as well; files with big exports or third-party models say
``pytestmark = pytest.mark.slow`` themselves. A ``slow`` test is never fast.
Blocks under ``if TYPE_CHECKING:`` are not run, so they do not count.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent

# What the fast tier's venv holds (scripts/test.sh --fast): the runtime, onnx, the test tools.
RUNTIME = frozenset({"npcam", "numpy", "PIL", "onnxruntime", "onnx", "pytest", "_pytest", "hypothesis"})
SLOW = frozenset({"ray", "pyarrow", "selenium"})


def _is_stdlib(name: str) -> bool:
    names = getattr(sys, "stdlib_module_names", None)  # Python >= 3.10
    if names is not None:
        return name in names or name in sys.builtin_module_names
    import importlib.util

    spec = importlib.util.find_spec(name)
    origin = (spec and spec.origin) or ""
    return origin in ("built-in", "frozen") or origin.startswith(sysconfig.get_paths()["stdlib"])


def allowed(name: str) -> bool:
    """A top-level module name that the fast tier may import."""
    return name in RUNTIME or _is_stdlib(name)


class _Module:
    """A parsed module of ``tests/``: its top-level definitions and what it imports from other local modules."""

    def __init__(self, path: Path):
        self.tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        self.defs: dict[str, ast.AST] = {}
        self.local_names: dict[str, tuple[str, str]] = {}  # name -> (local module, name in it)
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs[node.name] = node
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and not node.level and _local(node.module or ""):
                for alias in node.names:
                    self.local_names[alias.asname or alias.name] = (node.module, alias.name)


def _local(name: str) -> bool:
    return (HERE / f"{name}.py").is_file()


@functools.cache
def _module(name: str) -> _Module:
    return _Module(HERE / f"{name}.py")


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Name)
        and test.id == "TYPE_CHECKING"
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _nodes(roots: list[ast.AST], into_functions: bool):
    """Every node under ``roots``; function bodies only if ``into_functions`` (decorators and defaults always)."""
    todo = list(roots)
    while todo:
        node = todo.pop()
        if _type_checking(node):
            todo.extend(node.orelse)
            continue
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not into_functions:
            todo.extend(getattr(node, "decorator_list", []))
            todo.extend(node.args.defaults + [d for d in node.args.kw_defaults if d is not None])
            continue
        todo.extend(ast.iter_child_nodes(node))


def _needs(module: str, roots: list[ast.AST], into_functions: bool, seen: set) -> set[str]:
    """Top-level names of the modules that running ``roots`` (code of local ``module``) can import."""
    mod = _module(module)
    found: set[str] = set()

    def follow(name: str, attr: str | None = None) -> None:
        key = (name, attr)
        if key in seen:
            return
        seen.add(key)
        target = _module(name)
        if attr is None:
            found.update(_needs(name, target.tree.body, False, seen))
        elif attr in target.defs:
            found.update(_needs(name, [target.defs[attr]], True, seen))

    nodes = list(_nodes(roots, into_functions))
    # Parameters and local variables shadow the module's names (Server's `bundle` is not the fixture).
    local = {n.arg for n in nodes if isinstance(n, ast.arg)} if into_functions else set()
    if into_functions:
        local |= {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        local |= {(a.asname or a.name).split(".")[0] for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))
                  for a in n.names}  # fmt: skip
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                follow(top) if _local(top) else found.add(top)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            top = (node.module or "").split(".")[0]
            if _local(top):
                follow(top)
                for alias in node.names:
                    follow(top, alias.name)
            else:
                found.add(top)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "importorskip"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value.split(".")[0])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
            if node.id in mod.defs:
                follow(module, node.id)
            elif node.id in mod.local_names:
                follow(*mod.local_names[node.id])
    return found


@functools.cache
def file_needs(path: Path) -> frozenset[str]:
    """What importing the test file ``path`` can import; a file outside ``tests/`` is never fast."""
    if path.parent != HERE:
        return frozenset({f"<{path}>"})
    try:
        _module(path.stem)
    except SyntaxError:  # pytest reports it when it imports the file, in the full suite
        return frozenset({"<syntax error>"})
    return frozenset(_needs(path.stem, _module(path.stem).tree.body, False, set()))


def _function_needs(func) -> set[str]:
    """What calling ``func``, a function or method defined in ``tests/``, can import; empty if defined elsewhere."""
    func = inspect.unwrap(func)
    try:
        path = Path(inspect.getsourcefile(func)).resolve()
    except TypeError:
        return set()
    if path.parent != HERE:
        return set()
    mod = _module(path.stem)
    node: ast.AST | None = None
    scope = mod.defs
    for part in func.__qualname__.split("."):
        node = scope.get(part)
        if node is None:
            break
        scope = {n.name: n for n in getattr(node, "body", []) if hasattr(n, "name")}
    if node is None:  # made at run time; its whole module counts
        return set(_needs(path.stem, mod.tree.body, True, set()))
    return _needs(path.stem, [node], True, set()) | file_needs(path)


def item_needs(item) -> set[str]:
    """What running the test ``item`` can import: its file, its function and its fixtures."""
    needs = set(file_needs(Path(str(item.path)).resolve()))
    function = getattr(item, "function", None)
    if function is not None:
        needs |= _function_needs(function)
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        definitions = info.name2fixturedefs.get(name) if info is not None else None
        if definitions:
            needs |= _function_needs(definitions[-1].func)
    return needs


def tier(item) -> tuple[bool, bool]:
    """``(fast, slow)`` for a collected test."""
    needs = item_needs(item)
    slow = item.get_closest_marker("slow") is not None or bool(needs & SLOW)
    return (not slow and all(allowed(n) for n in needs)), slow
