"""The layout of ``backends/numba_cpu``: no import cycle among its modules, one module per op.

Imports are read with ``ast`` (module level and inside functions, absolute and relative), so
an import moved into a function to dodge a cycle still counts.
"""

from __future__ import annotations

import pytest
from test_layout import _cycle, _imports
from test_layout import _modules as _library_modules

PACKAGE = "arrayopt.backends.numba_cpu"


def _modules() -> dict:
    """``{dotted module name: source path}`` of every ``.py`` under ``backends/numba_cpu``."""
    return {n: p for n, p in _library_modules().items() if n == PACKAGE or n.startswith(PACKAGE + ".")}


def test_the_module_graph_is_read():
    modules = _modules()
    graph = {n: _imports(n, p, set(modules)) for n, p in modules.items()}
    assert f"{PACKAGE}._common" in graph[f"{PACKAGE}.first_order"]
    assert f"{PACKAGE}.sonew._gen_band_kernels" in graph[f"{PACKAGE}.sonew.whole"]
    assert f"{PACKAGE}.sonew.blocks" in graph[f"{PACKAGE}.sonew"]  # ``from .blocks import run_blocks``
    assert f"{PACKAGE}.sonew._gen_block_drivers" in graph[f"{PACKAGE}.sonew.blocks"]  # ``from . import x``
    assert f"{PACKAGE}.sonew" not in graph[f"{PACKAGE}.sonew.blocks"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_numba_cpu_modules():
    modules = _modules()
    graph = {n: _imports(n, p, set(modules)) for n, p in modules.items()}
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
