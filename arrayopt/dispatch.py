"""Backend registry: (op, step description, arrays) -> fused kernel, or the reference.

A backend registers itself with :func:`register_backend` and implements the
:class:`Backend` protocol. :func:`choose` walks the registered backends in
priority order and returns the first that is available, implements the op,
fuses the options of this step (:meth:`Backend.refuse_options`) and accepts
every array of the call (:meth:`Backend.refuse_arrays`); otherwise the caller
runs the pure array-API reference. Every refusal carries a reason, which
:func:`arrayopt.explain` shows to the user.

``ARRAYOPT_BACKEND=reference`` (or ``use_backend("reference")``) forces the
reference; ``ARRAYOPT_BACKEND=numba_cpu`` or ``cupy_cuda`` allows only that
one; ``use_backend(None)`` restores automatic choice inside its block, even
when ``ARRAYOPT_BACKEND`` is set. :func:`use_backend` is per thread.

Everything here is safe to call from several threads: the backends are
imported once, under a lock, before any thread looks at the registry.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = ["Backend", "Choice", "LeafChoice", "register_backend", "choose", "choose_leaves", "select",
           "use_backend", "backends", "forced_backend", "check_capabilities", "status", "available"]


@runtime_checkable
class Backend(Protocol):
    """What a backend implements (``backends/README.md`` explains how to add one).

    - ``name``: its name (``use_backend(name)``, ``ARRAYOPT_BACKEND=name``);
    - ``ops``: the op names it has kernels for (an optimizer's ``kernel_op``);
    - ``capabilities``: ``op -> {field: allowed}``: the options of each op's step
      description it fuses (``allowed``: a set of values, or a predicate); the one
      place where a backend says what its kernels cover (see :func:`check_capabilities`);
    - ``available()`` / ``reason()``: whether its package imports and a device is there,
      and why not (or what it serves);
    - ``refuse_arrays(ns, *groups)``: ``None`` if it takes these arrays (params, grads,
      state groups, one list of leaves each), else why not (dtype, device, layout, ...);
    - ``refuse_options(op, step)``: ``None`` if it fuses this step's options, else why not;
    - ``views(arrays)``, ``all_finite(views)``: the finiteness pre-pass on its own views; the
      views may also answer the range check before in-place kernels themselves
      (``views.squares_below(fraction)``: every ``‖v‖² < fraction·max(dtype)``; else
      :func:`arrayopt._overflow.gradients_in_range` takes ``v @ v`` of each);
    - optionally ``refuse_leaves(op, ns, *groups)``: one reason (or ``None``) per leaf, for the
      optimizers whose step splits its leaves (:func:`choose_leaves`); a backend without it
      takes all the leaves of a call or none (``refuse_arrays``);
    - ``run(op, params, grads, states, step, g_views=None)``: the fused step in place.
      ``step`` is the op's frozen step description (the first-order ops: the tuple of
      ``step_scalars``; SONew: :class:`arrayopt.sonew.step.SONewStep`), never the
      optimizer. Returns ``None`` or per-leaf statistics the op defines (SONew:
      ``[(removed_edges, fallback_rows)]``).
    """

    name: str
    ops: frozenset
    capabilities: dict

    def available(self) -> bool: ...

    def reason(self) -> str: ...

    def refuse_arrays(self, ns, *groups) -> str | None: ...

    def refuse_options(self, op: str, step) -> str | None: ...

    def views(self, arrays) -> list: ...

    def all_finite(self, views) -> bool: ...

    def run(self, op: str, params, grads, states, step, g_views=None): ...


class Choice(NamedTuple):
    """The outcome of :func:`choose`: ``backend`` (``None``: the reference) and why."""

    backend: Any
    reason: str


# registered backend objects (stateless: kernels take per-call buffers); appended only under
# _lock, iterated over a copy, so concurrent steps and registrations are safe
_BACKENDS: list = []
_lock = threading.RLock()  # guards _BACKENDS and the one-time import of the built-in backends
_local = threading.local()
_loaded = False
_AUTO = "auto"  # use_backend(None): automatic choice, ignoring ARRAYOPT_BACKEND


def register_backend(backend: Any) -> None:
    """Add ``backend`` to the registry (later registrations have lower priority).

    ``backend`` must implement :class:`Backend`; a second backend with a registered
    name is ignored.
    """
    missing = [a for a in ("name", "ops", "capabilities", "available", "reason", "refuse_arrays",
                           "refuse_options", "views", "all_finite", "run") if not hasattr(backend, a)]
    if missing:
        raise TypeError(f"backend: {type(backend).__name__} does not implement the Backend protocol "
                        f"(missing {', '.join(missing)})")
    with _lock:
        if any(b.name == backend.name for b in _BACKENDS):
            return
        _BACKENDS.append(backend)


def _load() -> None:
    """Import (once) the built-in backends, which register themselves.

    ``_loaded`` is set only after the import finished, under the lock: a thread that
    arrives meanwhile waits instead of seeing an empty registry.
    """
    global _loaded
    if _loaded:
        return
    with _lock:
        if not _loaded:
            from .backends import BUILTIN

            for b in BUILTIN:
                register_backend(b)
            _loaded = True


def backends() -> list:
    """Every registered backend, in priority order (available or not)."""
    _load()
    with _lock:
        return list(_BACKENDS)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``ARRAYOPT_BACKEND`` (None: automatic)."""
    forced = getattr(_local, "forced", None)
    if forced is None:  # no use_backend block in this thread
        forced = os.environ.get("ARRAYOPT_BACKEND") or None
    return None if forced == _AUTO else forced


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend ("reference", "numba_cpu", "cupy_cuda", ...) in a block of this thread.

    ``None`` means automatic choice, and overrides ``ARRAYOPT_BACKEND`` inside the block.
    """
    valid = {"reference", None} | {b.name for b in backends()}
    if name not in valid:
        raise ValueError(f"use_backend: unknown backend {name!r}; choose from {sorted(v for v in valid if v)}")
    old = getattr(_local, "forced", None)
    _local.forced = _AUTO if name is None else name
    try:
        yield
    finally:
        _local.forced = old


def check_capabilities(capabilities: dict, op: str, step) -> str | None:
    """``None`` if every option of ``step`` listed in ``capabilities[op]`` is allowed, else why not
    (:func:`arrayopt.backends._optable.check_capabilities`, which the backends call themselves)."""
    from .backends._optable import check_capabilities as check

    return check(capabilities, op, step)


def status() -> dict:
    """Each registered backend's name -> (available, reason) (``reason`` says why not, or what it
    serves), including backends added with :func:`register_backend`."""
    return {b.name: (b.available(), b.reason()) for b in backends()}


def available() -> list:
    """Names of the registered backends that are active on this machine and not excluded by
    ``use_backend`` / ``ARRAYOPT_BACKEND`` (the reference is always there)."""
    forced = forced_backend()
    if forced == "reference":
        return []
    names = [name for name, (ok, _) in status().items() if ok]
    return [n for n in names if forced is None or n == forced]


def choose(op: str, ns, step, *groups) -> Choice:
    """The backend that runs ``op`` with this step description on these arrays, and why.

    ``groups``: lists of leaves (params, grads, then each state entry). Returns
    ``Choice(None, reason)`` when the reference runs.
    """
    forced = forced_backend()
    if not op:
        return Choice(None, "no fused kernel exists for this optimizer")
    if forced == "reference":
        return Choice(None, "the reference is forced (use_backend('reference') or ARRAYOPT_BACKEND=reference)")
    refusals = []
    for b in backends():
        if forced is not None and b.name != forced:
            continue
        if op not in b.ops:
            refusals.append(f"{b.name}: no {op!r} kernel")
            continue
        why = b.refuse_options(op, step)
        if why is None:
            # refuse_arrays() only looks at the arrays; available() may import the backend's package
            why = b.refuse_arrays(ns, *groups)
        if why is None and not b.available():
            why = b.reason()
        if why is None:
            return Choice(b, f"{b.name}: fused kernel")
        refusals.append(f"{b.name}: {why}")
    if forced is not None and not refusals:
        refusals.append(f"{forced} is forced but not registered")
    return Choice(None, "; ".join(refusals) or "no backend is registered")


class LeafChoice(NamedTuple):
    """The outcome of :func:`choose_leaves`: ``backend`` (``None``: every leaf takes the reference),
    why (for the whole call) and, per leaf, ``None`` (the backend takes it) or why not."""

    backend: Any
    reason: str
    refusals: tuple


def choose_leaves(op: str, ns, step, *groups) -> LeafChoice:
    """The backend that runs ``op`` on the leaves it takes, the others taking the reference.

    The first backend (in priority order) that fuses this step's options and takes at least one
    leaf (``refuse_leaves``; a backend without it: ``refuse_arrays`` for all of them at once).
    """
    n = len(groups[0]) if groups else 0
    forced = forced_backend()
    if not op:
        return LeafChoice(None, "no fused kernel exists for this optimizer", ("no fused kernel",) * n)
    if forced == "reference":
        why = "the reference is forced (use_backend('reference') or ARRAYOPT_BACKEND=reference)"
        return LeafChoice(None, why, (why,) * n)
    refusals, per_leaf = [], None
    for b in backends():
        if forced is not None and b.name != forced:
            continue
        if op not in b.ops:
            refusals.append(f"{b.name}: no {op!r} kernel")
            continue
        why = b.refuse_options(op, step)
        if why is None and not b.available():
            why = b.reason()
        if why is not None:
            refusals.append(f"{b.name}: {why}")
            continue
        refuse_leaves = getattr(b, "refuse_leaves", None)
        if refuse_leaves is not None:
            leaves = tuple(refuse_leaves(op, ns, *groups))
        else:
            whole = b.refuse_arrays(ns, *groups)
            leaves = (whole,) * n
        if any(r is None for r in leaves):
            taken = sum(r is None for r in leaves)
            what = "fused kernel" if taken == n else f"fused kernel for {taken} of {n} leaves (the others: the reference)"
            return LeafChoice(b, f"{b.name}: {what}", tuple(None if r is None else f"{b.name}: {r}" for r in leaves))
        refusals.append(f"{b.name}: {leaves[0] if leaves and all(r == leaves[0] for r in leaves) else 'no leaf taken'}")
        if per_leaf is None:
            per_leaf = tuple(f"{b.name}: {r}" for r in leaves)
    if forced is not None and not refusals:
        refusals.append(f"{forced} is forced but not registered")
    why = "; ".join(refusals) or "no backend is registered"
    return LeafChoice(None, why, per_leaf if per_leaf is not None else (why,) * n)


def select(op: str, ns, *groups, step=None):
    """The backend that runs ``op`` on these arrays, or ``None`` for the reference path.

    ``step``: the op's step description, to check the fused options (``None``: arrays only).
    """
    return choose(op, ns, step, *groups).backend
