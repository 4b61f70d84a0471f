"""The op table of a backend: which ops it fuses, with which options, and which module runs them.

Each op module of a backend (``backends/numba_cpu/sonew/``, ``backends/cupy_cuda/eva.py``, ...)
declares at module level

- ``OPS``: ``{op name: capabilities}``, the capabilities as in
  :func:`arrayopt.dispatch.check_capabilities` (``{step field: allowed values or predicate}``);
- ``run(backend, op, params, grads, states, step, g_views)``: the fused step of ``op`` in place.

and imports nothing optional at module level (CuPy, torch): a backend's table is built by
importing its op modules, also on machines where the backend is not available. A backend
finds its op modules by listing its own package (:func:`collect`), so adding an op is adding
a module: no table to edit by hand.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from types import MappingProxyType, ModuleType
from typing import NamedTuple

__all__ = ["OpEntry", "collect", "check_capabilities"]


class OpEntry(NamedTuple):
    """One row of the table: the module whose ``run`` fuses ``op``, and what it fuses."""

    module: ModuleType
    capabilities: MappingProxyType


def collect(package: str, path) -> MappingProxyType:
    """``{op: OpEntry}`` from every module (or subpackage) of ``package`` that declares ``OPS``.

    ``package``: the backend's import name (``__name__`` of its ``__init__``); ``path``: its
    ``__path__``. Modules whose name starts with ``_`` are private helpers and are skipped.
    Two modules declaring one op raise ``ValueError`` naming both.
    """
    table: dict = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        ops = getattr(module, "OPS", None)
        if ops is None:
            continue
        if not callable(getattr(module, "run", None)):
            raise TypeError(f"{module.__name__}: declares OPS but has no run(backend, op, params, grads, "
                            f"states, step, g_views)")
        for op, caps in ops.items():
            if op in table:
                raise ValueError(f"op {op!r}: declared by both {table[op].module.__name__} and {module.__name__}")
            table[op] = OpEntry(module, MappingProxyType(dict(caps)))
    return MappingProxyType(table)


def check_capabilities(capabilities: dict, op: str, step) -> str | None:
    """``None`` if every option of ``step`` listed in ``capabilities[op]`` is allowed, else why not.

    ``capabilities[op]`` maps a field of the (dataclass) step description to the set of
    values the kernels fuse, or to a predicate ``value -> bool``. Ops whose step is a
    plain tuple of scalars (the first-order ops) list no fields.
    """
    fields = capabilities.get(op, {})
    for field, allowed in fields.items():
        if not dataclasses.is_dataclass(step) or not hasattr(step, field):
            continue
        value = getattr(step, field)
        ok = allowed(value) if callable(allowed) else value in allowed
        if not ok:
            what = "" if callable(allowed) else f" (fused: {', '.join(sorted(map(repr, allowed)))})"
            doc = getattr(allowed, "__doc__", None) if callable(allowed) else None
            return f"{field}={value!r} is not fused{what}" + (f" ({doc.strip()})" if doc else "")
    return None
