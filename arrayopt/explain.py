"""``explain(opt, params)``: which path each leaf's step takes (a fused kernel or the reference) and why.

For the optimizers whose leaves step independently (``per_leaf_dispatch``: the
first-order optimizers and SONew) each leaf takes its own path: the first backend (in
priority order) that fuses the optimizer's options runs the leaves it accepts, and the
others (a bfloat16 leaf, a layout the kernels do not read) take the pure array-API
reference alone (``arrayopt.dispatch.choose_leaves``). For the others a step runs on one
path for all its leaves (``arrayopt.dispatch.choose``), and :func:`explain` also asks for
each leaf on its own, so a user learns, e.g., that a bfloat16 leaf sends the step to the
reference. The call's ``backend`` is ``"mixed"`` when its leaves take different paths.

>>> import numpy as np, ml_dtypes, arrayopt as ao
>>> print(ao.explain(ao.sonew(1e-3), {"w": np.zeros((4, 3), ml_dtypes.bfloat16)}))
... # doctest: +ELLIPSIS
sonew (op 'sonew'): reference -- numba_cpu: params leaf ['w']: dtype bfloat16 (kernels take float32/float64); ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import _validate

__all__ = ["explain", "Explanation", "LeafPath"]


@dataclass(frozen=True)
class LeafPath:
    """One leaf: its path in the tree, shape, dtype, the path its step takes and why."""

    path: str
    shape: tuple
    dtype: str
    backend: str  # a backend's name, or "reference"
    reason: str


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` returns; ``str()`` (and ``repr()``) is a readable table."""

    optimizer: str
    op: str
    backend: str  # a backend's name, or "reference"
    reason: str
    leaves: tuple

    def __str__(self) -> str:
        head = f"{self.optimizer} (op {self.op!r}): {self.backend} -- {self.reason}"
        rows = [f"  {lp.path}  {lp.dtype}{list(lp.shape)}: {lp.backend} -- {lp.reason}" for lp in self.leaves]
        return "\n".join([head] + rows)

    __repr__ = __str__


def explain(opt, params, grads=None, state=None) -> Explanation:
    """Which path ``opt.step(params, grads, state)`` takes for each leaf, and why.

    ``grads`` defaults to arrays like ``params`` (their dtype and layout are what
    matter); ``state`` to ``opt.init(params)``. Honours ``use_backend`` and
    ``ARRAYOPT_BACKEND`` like the step does. Nothing is computed or written.
    """
    from . import dispatch
    from .base import Optimizer

    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt: expected an arrayopt optimizer, got {type(opt).__name__}")
    leaves, treedef, paths, ns = _validate.check_params(params)
    g_leaves = leaves if grads is None else _validate.check_like("grads", grads, treedef, paths, leaves, ns)
    if state is None:
        state = opt.init(params)
    from .groups import Partition

    if isinstance(opt, Partition):
        return _explain_groups(opt, treedef, paths, leaves, g_leaves, state)
    op = opt.kernel_op
    count = state.get("count", 0) if isinstance(state, dict) else 0
    step = opt.step_description(count) if op else None
    if op and opt.per_leaf_dispatch:
        return _explain_per_leaf(opt, ns, step, paths, leaves, g_leaves, state)
    whole = opt._choose(ns, step, leaves, g_leaves, state) if op else None
    if whole is None:
        name, reason = "reference", opt.no_kernel_reason
    else:
        name = whole.backend.name if whole.backend else "reference"
        reason = _name_leaves(whole.reason, paths)
    groups = opt._kernel_groups(leaves, g_leaves, state) if op else ()
    out = []
    for i, (p, path) in enumerate(zip(leaves, paths)):
        if whole is not None and whole.backend is None:
            alone = dispatch.choose(op, ns, step, *[[grp[i]] for grp in groups])
            why = _name_leaves(alone.reason, [path]) if alone.backend is None else \
                f"this leaf alone would take {alone.backend.name}, but another leaf sends the step to the reference"
        else:
            why = reason
        out.append(LeafPath(_tree_path(path), tuple(int(d) for d in p.shape), _dtype(p), name, why))
    return Explanation(getattr(opt, "name", type(opt).__name__), op or "", name, reason, tuple(out))


def _explain_per_leaf(opt, ns, step, paths, leaves, g_leaves, state) -> Explanation:
    """Each leaf's own path (``arrayopt.dispatch.choose_leaves``, as the step splits them)."""
    backend, reason, refusals = opt._choose_leaves(ns, step, leaves, g_leaves, state)
    name = backend.name if backend is not None else "reference"
    out = []
    for p, path, why in zip(leaves, paths, refusals):
        leaf_backend = name if why is None else "reference"
        leaf_why = f"{name}: fused kernel" if why is None else _name_leaves(why, paths)
        out.append(LeafPath(_tree_path(path), tuple(int(d) for d in p.shape), _dtype(p), leaf_backend, leaf_why))
    if backend is not None and any(r is not None for r in refusals):
        name = "mixed"
    return Explanation(getattr(opt, "name", type(opt).__name__), opt.kernel_op, name, _name_leaves(reason, paths),
                       tuple(out))


def _explain_groups(opt, treedef, paths, leaves, g_leaves, state) -> Explanation:
    """A partition: each group's optimizer explained on its own leaves (each group steps on its own)."""
    from .groups import _subtree

    by_path = {}
    for k, label in enumerate(opt.keys):
        keep = [g == k for g in state["groups"]]
        if not any(keep):
            continue
        part = opt.transforms[label]
        sub = explain(part, _subtree(treedef, leaves, keep), _subtree(treedef, g_leaves, keep), state["inner"][k])
        for lp in sub.leaves:
            by_path[lp.path] = LeafPath(lp.path, lp.shape, lp.dtype, lp.backend,
                                        f"group {label!r} ({sub.optimizer}): {lp.reason}")
    rows = tuple(by_path[_tree_path(p)] for p in paths)
    return Explanation(opt.name, "", "per group", opt.no_kernel_reason, rows)


def _name_leaves(reason: str, paths) -> str:
    """Replace the backends' ``leaf <i>`` by the leaf's path in the tree."""
    def name(m):
        i = int(m.group(1))
        return f"leaf {_tree_path(paths[i])}" if i < len(paths) else m.group(0)

    return re.sub(r"leaf (\d+)", name, reason)


def _tree_path(path) -> str:
    return path if isinstance(path, str) else str(path)


def _dtype(a) -> str:
    from ._xp import dtype_name

    return dtype_name(a.dtype)
