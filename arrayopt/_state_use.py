"""The state header and who may step a state: its use token, deep copies, torch math without autograd.

A state passed to ``update``/``step`` is consumed: fused kernels reuse its arrays in place.
Every shallow copy of a state (``dict(state)``, ``copy.copy``) shares those arrays, so the
mark must be shared too. It lives on ``state["param_paths"]``, a :class:`LeafPaths` (a
tuple of the params leaf paths that also carries the state's use token): shallow copies hold
the same object, so a step taken from any of them consumes them all. The token is taken
atomically (a non-blocking lock acquire) before anything is written, which also stops two
threads from stepping one state at once. A :class:`LeafPaths` saves and loads as the plain
tuple it is; :func:`fresh_tokens` gives a loaded state tokens of its own, and a deep copy
or a pickle gets a new token that keeps the consumed mark.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Any

from ._xp import namespace_of

__all__ = ["LeafPaths", "HEADER", "copy_state", "fresh_tokens", "take", "no_autograd", "detached", "settle",
           "is_array", "refuse_consumed"]

_install_lock = threading.Lock()  # makes "give a plain-tuple state a token" one step


class LeafPaths(tuple):
    """The params leaf paths of a state, and the state's use token (see the module docstring)."""

    def __new__(cls, paths=(), consumed: bool = False):
        self = super().__new__(cls, paths)
        self._lock = threading.Lock()
        if consumed:
            self._lock.acquire()
        return self

    @property
    def consumed(self) -> bool:
        """Taken by an ``update``/``step`` (finished, or still running in another thread)."""
        return self._lock.locked()

    def take(self) -> bool:
        """Mark the state consumed; ``False`` if it already was (atomic test-and-set)."""
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        """Undo :meth:`take`: the call raised before writing anything."""
        self._lock.release()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return LeafPaths(tuple(self), self.consumed)

    def __reduce__(self):
        return LeafPaths, (tuple(self), self.consumed)


#: keys every optimizer state carries besides its own entries
HEADER = ("optimizer", "count", "nonfinite_skipped", "param_paths", "consumed")


def _header(name: str, paths) -> dict:
    return {"optimizer": name, "count": 0, "nonfinite_skipped": 0, "param_paths": LeafPaths(paths),
            "consumed": False}


def _check_state_header(state: Any, name: str, where: str = "state") -> None:
    if not isinstance(state, dict):
        raise TypeError(f"{where}: expected the dict returned by init(), got {type(state).__name__}")
    owner = state.get("optimizer")
    if owner != name:
        raise ValueError(f"{where}: made by optimizer {owner!r}, but this optimizer is {name!r}")
    for key in ("count", "nonfinite_skipped"):
        v = state.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}[{key!r}]: expected a non-negative int, got {v!r}")
    consumed = state.get("consumed")
    if consumed is True:
        raise ValueError(
            f"{where}: already consumed by an earlier update()/step() (the state passed to them is "
            f"consumed, and fused kernels reuse its buffers in place); pass the state that call returned")
    if consumed is False and is_consumed(state):
        raise ValueError(
            f"{where}: already consumed by an update()/step() given this state or a shallow copy of it "
            f"(e.g. dict(state), which shares the arrays fused kernels update in place), finished or "
            f"running in another thread; pass the state that call returned, or keep a copy made by "
            f"arrayopt.copy_state()")
    if consumed is not False:
        raise ValueError(f"{where}['consumed']: expected False, got {consumed!r}; "
                         f"was the state made by init() or load_state()?")
    pp = state.get("param_paths")
    if not isinstance(pp, tuple) or not all(isinstance(x, str) for x in pp):
        raise ValueError(f"{where}['param_paths']: expected a tuple of leaf paths, got {type(pp).__name__}; "
                         f"was the state made by init() or load_state()?")


def _check_state_paths(state: dict, paths, arg: str, where: str = "state") -> None:
    """The params (or grads) tree has the leaf paths the state was made for."""
    saved = state["param_paths"]
    if list(saved) != list(paths):
        diff = next((i for i, (a, b) in enumerate(zip(saved, paths)) if a != b), min(len(saved), len(paths)))
        got = paths[diff] if diff < len(paths) else "<none>"
        want = saved[diff] if diff < len(saved) else "<none>"
        raise ValueError(
            f"{arg}: leaf {diff} is {got}, but the state was made by init() for a tree whose leaf {diff} "
            f"is {want} ({len(saved)} leaves); pass the params tree the state was made for")


def _copy_state(state: dict) -> dict:
    """A shallow copy of the same class that keeps pending work (e.g. an in-flight root job)."""
    return copy.copy(state)


def _hand_over(old: dict, new: dict) -> dict:
    """Mark ``old`` consumed and return ``new`` as a distinct, unconsumed state with a use token of
    its own (``old``'s token was taken by :func:`arrayopt._state_use.take`)."""
    if new is old:
        new = _copy_state(old)
    old["consumed"] = True
    new["param_paths"] = LeafPaths(tuple(old["param_paths"]))
    new["consumed"] = False
    return new


def _token(state: dict) -> LeafPaths:
    """The state's token; a state whose paths are a plain tuple (built by hand or by an adapter)
    gets one here, under a lock so that two threads install the same one."""
    pp = state["param_paths"]
    if isinstance(pp, LeafPaths):
        return pp
    with _install_lock:
        pp = state["param_paths"]
        if not isinstance(pp, LeafPaths):
            pp = state["param_paths"] = LeafPaths(pp)
    return pp


@contextlib.contextmanager
def take(state: dict, where: str = "state"):
    """Take the state's token for one ``update``/``step``; give it back if the call raises.

    Raises a ``ValueError`` naming ``where`` when the token is taken already: another thread
    is stepping this state (or a shallow copy of it) right now, or a step consumed it.
    """
    token = _token(state)
    if not token.take():
        raise ValueError(
            f"{where}: consumed by another update()/step() (one running at the same time in another "
            f"thread, or an earlier one given this state or a shallow copy of it, e.g. dict(state)); "
            f"a state can be stepped once: use the state that call returned, or keep a copy made by "
            f"arrayopt.copy_state()")
    try:
        yield
    except BaseException:
        token.release()
        raise


def is_consumed(state: dict) -> bool:
    pp = state.get("param_paths")
    return state.get("consumed") is True or (isinstance(pp, LeafPaths) and pp.consumed)


def fresh_tokens(node: Any) -> Any:
    """``node`` with a fresh :class:`LeafPaths` in every (nested) state; returns ``node``."""
    if isinstance(node, dict):
        if "optimizer" in node and isinstance(node.get("param_paths"), tuple):
            node["param_paths"] = LeafPaths(tuple(node["param_paths"]))
        for v in node.values():
            fresh_tokens(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            fresh_tokens(v)
    return node


def _copy_array(a):
    import array_api_compat as compat

    if compat.is_torch_array(a):
        return a.detach().clone()
    return compat.array_namespace(a).asarray(a, copy=True)


def is_array(x) -> bool:
    """Whether ``x`` is an array of a namespace array-api-compat knows (not a Python scalar or container)."""
    if isinstance(x, (bool, int, float, str, type(None), dict, list, tuple)):
        return False
    try:
        namespace_of(x)
        return True
    except TypeError:
        return False


def settle(node) -> None:
    """Let every object in the tree with pending work (asynchronous roots) finish."""
    if isinstance(node, dict):
        fn = getattr(node, "settle", None)
        if callable(fn):
            fn()
        for v in node.values():
            settle(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            settle(v)


def _deep(node):
    if isinstance(node, dict):
        out = type(node)({k: _deep(v) for k, v in node.items()})
        if "optimizer" in out and isinstance(out.get("param_paths"), tuple):
            out["param_paths"] = LeafPaths(tuple(out["param_paths"]))
        return out
    if isinstance(node, list):
        return [_deep(v) for v in node]
    if isinstance(node, tuple):
        return tuple(_deep(v) for v in node)
    if is_array(node):
        return _copy_array(node)
    return node


def refuse_consumed(node, remedy: str, path: str = "") -> None:
    """Raise ``ValueError`` if ``node`` holds a state (nested ones too, e.g. in a chain) that an
    ``update()``/``step()`` consumed, or a shallow copy of one; ``remedy`` ends the message."""
    if isinstance(node, dict):
        if "optimizer" in node and is_consumed(node):
            raise ValueError(f"state{path}: already consumed by update()/step() {remedy}")
        for k, v in node.items():
            refuse_consumed(v, remedy, f"{path}[{k!r}]")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            refuse_consumed(v, remedy, f"{path}[{i}]")


def copy_state(state: Any) -> Any:
    """A deep copy of ``state``: new arrays (same namespace, device and dtype), a use token of its
    own, pending work settled. Keep one to step from later: ``backup = copy_state(state)``;
    stepping ``state`` leaves ``backup`` as it was (``dict(state)`` would share the arrays that a
    fused step updates in place, and is refused once ``state`` has been stepped). Raises a
    ``ValueError`` for a state that ``update``/``step`` already consumed."""
    refuse_consumed(state, "(its arrays may have been reused in place); copy the state that call "
                           "returned, before stepping it")
    settle(state)
    return _deep(state)


def no_autograd(ns):
    """``torch.no_grad()`` for torch arrays (no state array or update records a graph), else nothing."""
    if ns.library != "torch":
        return contextlib.nullcontext()
    import torch

    return torch.no_grad()


def detached(ns, leaves: list) -> list:
    """Torch tensors detached from autograd (same memory); other arrays as they are."""
    if ns.library != "torch":
        return leaves
    return [x.detach() if x.requires_grad else x for x in leaves]
