"""Backend registry: (op, array type, device, dtype) -> fused kernel, or the reference.

A backend registers itself with :func:`register_backend`; each one says which
ops it implements and which arrays it accepts (library, device, dtype,
contiguity, writeability). :func:`select` returns the first backend, in
priority order, that is available, implements the op and accepts every array of
the call; otherwise ``None`` and the caller runs the pure array-API reference.

``ARRAYOPT_BACKEND=reference`` (or :func:`use_backend("reference")`) forces the
reference; ``ARRAYOPT_BACKEND=numba_cpu`` or ``cupy_cuda`` allows only that one.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Protocol

__all__ = ["Backend", "register_backend", "select", "use_backend", "backends", "forced_backend"]


class Backend(Protocol):
    name: str
    ops: frozenset

    def available(self) -> bool: ...

    def accepts(self, ns, *groups) -> bool: ...

    def views(self, arrays) -> list: ...

    def all_finite(self, views) -> bool: ...

    def run(self, op: str, params, grads, states, scalars, g_views=None) -> None: ...


_BACKENDS: list = []
_local = threading.local()
_loaded = False


def register_backend(backend: Any) -> None:
    """Add ``backend`` to the registry (later registrations have lower priority)."""
    if any(b.name == backend.name for b in _BACKENDS):
        return
    _BACKENDS.append(backend)


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from . import backends  # noqa: F401  (registers numba_cpu and cupy_cuda)


def backends() -> list:
    _load()
    return list(_BACKENDS)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``ARRAYOPT_BACKEND`` (None: automatic)."""
    forced = getattr(_local, "forced", None)
    if forced is None:
        forced = os.environ.get("ARRAYOPT_BACKEND") or None
    return forced


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend ("reference", "numba_cpu", "cupy_cuda") or automatic (None) in a block."""
    valid = {"reference", None} | {b.name for b in backends()}
    if name not in valid:
        raise ValueError(f"use_backend: unknown backend {name!r}; choose from {sorted(v for v in valid if v)}")
    old = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = old


def select(op: str, ns, *groups):
    """The backend that runs ``op`` on these arrays, or ``None`` for the reference path."""
    forced = forced_backend()
    if forced == "reference" or not op:
        return None
    _load()
    for b in _BACKENDS:
        if forced is not None and b.name != forced:
            continue
        # accepts() only looks at the arrays; available() may import the backend's package
        if op in b.ops and b.accepts(ns, *groups) and b.available():
            return b
    return None
