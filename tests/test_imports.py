"""oodens as a library: every module imports on its own, and no two modules import each other.

Modules are discovered (``pkgutil.walk_packages``), so a new module is covered without
touching this file. The import graph is read from the source with ``ast`` and counts every
oodens-internal import, at module level and inside functions alike: an import moved into a
function hides a cycle from the interpreter, not from the design.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import oodens

PACKAGE_DIR = Path(oodens.__file__).resolve().parent
#: entry points that run when imported (``python -m oodens``), not library modules
NOT_IMPORTABLE = {"oodens.__main__"}


def _module_names() -> list[str]:
    names = ["oodens"] + [m.name for m in pkgutil.walk_packages(oodens.__path__, prefix="oodens.")]
    return sorted(n for n in names if n not in NOT_IMPORTABLE)


MODULES = _module_names()

# One fresh interpreter imports every module in turn, each after every oodens module is dropped
# from sys.modules, so no module leans on one imported before it (third-party packages stay
# loaded: importing torch once keeps this fast).
_IMPORT_EACH = textwrap.dedent(
    """
    import importlib, json, sys, traceback

    failures = {}
    for name in sys.argv[1:]:
        for loaded in [m for m in sys.modules if m == "oodens" or m.startswith("oodens.")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except BaseException:
            failures[name] = traceback.format_exc()
    print("IMPORT-RESULTS " + json.dumps(failures))
    """
)


@pytest.fixture(scope="module")
def import_failures() -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *MODULES], capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("IMPORT-RESULTS ")]
    assert proc.returncode == 0 and lines, f"the import run failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1].removeprefix("IMPORT-RESULTS "))


def test_modules_are_discovered():
    assert {"oodens.cli", "oodens.views.extract", "oodens.data.digits", "oodens.detectors.base"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_on_its_own(name, import_failures):
    assert name not in import_failures, f"`import {name}` in a fresh interpreter failed:\n{import_failures[name]}"


# ------------------------------------------------------------------ the import graph


def _source_modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package), for every .py file under oodens/."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph() -> dict[str, dict[str, list[int]]]:
    """Module -> {oodens module it imports -> the lines that import it}, from every import statement
    (module level, in functions, under ``if TYPE_CHECKING``). ``from oodens.x import y`` is an edge to
    ``oodens.x.y`` when that is a module, else to ``oodens.x``."""
    modules = _source_modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, list[int]]] = {m: {} for m in modules}
    for module, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = module.split(".") if is_package else module.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                target = known(target) if target == "oodens" or target.startswith("oodens.") else None
                if target and target != module and node.lineno not in graph[module].get(target, []):
                    graph[module].setdefault(target, []).append(node.lineno)
    return graph


def import_cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def _describe(cycle: list[str], graph: dict[str, dict[str, list[int]]]) -> str:
    modules = _source_modules()
    lines = [" <-> ".join(cycle)]
    for a in cycle:
        path = modules[a][0].relative_to(PACKAGE_DIR.parent)
        for b, at in sorted(graph[a].items()):
            if b in cycle:
                lines.append(f"    {a} -> {b}  ({', '.join(f'{path}:{n}' for n in at)})")
    return "\n".join(lines)


def test_import_graph_finds_edges_and_cycles():
    """The checker itself: resolved edges, and a planted cycle is reported."""
    graph = import_graph()
    assert "oodens.detectors.base" in graph["oodens.detectors.logit"]  # from oodens.detectors.base import ...
    assert "oodens.detectors.logit" in graph["oodens.detectors"]  # from oodens.detectors import logit (submodule)
    assert "oodens.errors" in graph["oodens.modes.checkpoints"]
    planted = {"a": {"b": [1]}, "b": {"c": [2]}, "c": {"a": [3]}, "d": {"a": [4]}}
    assert import_cycles(planted) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b": [1]}, "b": {}}) == []


def test_no_import_cycles():
    """No oodens module reaches itself through imports (module-level or in functions): the layers are
    checkpoints -> modes -> views -> detectors -> ensemble -> metrics -> results -> report, with runtime
    helpers (device, distributed, progress, paths, errors) beside them, importing nothing of the flow."""
    graph = import_graph()
    cycles = import_cycles(graph)
    assert not cycles, "import cycles among oodens modules:\n" + "\n".join(_describe(c, graph) for c in cycles)
