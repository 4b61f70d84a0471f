"""The layout of ``backends/numba_cpu``: no import cycle among its modules, one module per op.

Imports are read with ``ast`` (module level and inside functions, absolute and relative), so
an import moved into a function to dodge a cycle still counts.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "arrayopt.backends.numba_cpu"
FOLDER = os.path.join(ROOT, "backends", "numba_cpu")


def _modules() -> dict:
    """``{dotted module name: source path}`` of every ``.py`` under ``backends/numba_cpu``."""
    out = {}
    for dirpath, _, files in os.walk(FOLDER):
        rel = os.path.relpath(dirpath, FOLDER)
        parts = [] if rel == "." else rel.split(os.sep)
        for f in files:
            if f.endswith(".py"):
                name = ".".join([PACKAGE, *parts] + ([] if f == "__init__.py" else [f[:-3]]))
                out[name] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, modules: dict) -> set:
    """The modules of ``modules`` that ``name`` imports anywhere in its source."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
            subs = [f"{mod}.{a.name}" for a in node.names]
            targets = [t for t in subs if t in modules] or [mod]
            if len(targets) < len(subs) and mod not in targets:
                targets.append(mod)
        else:
            continue
        for t in targets:
            if t in modules and t != name:
                found.add(t)
    return found


def _cycle(graph: dict):
    """One import cycle of ``graph`` as a list of names, or ``None``."""
    state: dict = {}
    stack: list = []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_module_graph_is_read():
    modules = _modules()
    graph = {n: _imports(n, p, modules) for n, p in modules.items()}
    assert f"{PACKAGE}._common" in graph[f"{PACKAGE}.first_order"]
    assert f"{PACKAGE}.sonew._gen_band_kernels" in graph[f"{PACKAGE}.sonew.whole"]
    assert f"{PACKAGE}.sonew.blocks" in graph[f"{PACKAGE}.sonew"]  # ``from .blocks import run_blocks``
    assert f"{PACKAGE}.sonew._gen_block_drivers" in graph[f"{PACKAGE}.sonew.blocks"]  # ``from . import x``
    assert f"{PACKAGE}.sonew" not in graph[f"{PACKAGE}.sonew.blocks"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_numba_cpu_modules():
    modules = _modules()
    graph = {n: _imports(n, p, modules) for n, p in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_every_op_is_declared_by_exactly_one_module():
    pytest.importorskip("numba", reason="the Numba backend needs numba")
    import importlib

    from arrayopt.backends.numba_cpu import BACKEND, TABLE

    declared: dict = {}
    for name in _modules():
        module = importlib.import_module(name)
        for op in getattr(module, "OPS", {}):
            declared.setdefault(op, []).append(name)
    assert set(declared) == set(BACKEND.ops) == set(TABLE)
    for op in BACKEND.ops:
        assert len(declared[op]) == 1, f"op {op!r} declared by {declared[op]}"
        assert TABLE[op].module.__name__ == declared[op][0]
        assert dict(BACKEND.capabilities[op]) == dict(TABLE[op].module.OPS[op])
