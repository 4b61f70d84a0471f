r"""Shampoo's per-block work on stacks of equal blocks (one call per group, not per block).

At ``init`` the blocks of all preconditioned leaves are grouped by ``(block shape, mask)``
(:func:`group_blocks`, a plan made once per tree of shapes); each step stacks a group's blocks
``G_1..G_n`` into one ``(n, *shape)`` array and runs, batched over the leading axis
(``matmul`` broadcasts over it in every array-API namespace):

.. math::
    F^{(j)}_i \leftarrow w_1 F^{(j)}_i + w_2\, G_i^{(j)} G_i^{(j)\top},\qquad
    D_i = G_i \times_1 R^{(1)}_i \cdots \times_k R^{(k)}_i,\qquad
    Ĝ_i = G_i \times_j Q^{(j)\top}_i

with the same contraction order as :mod:`arrayopt.shampoo.math` (so each member's result equals
the per-block one up to the rounding of the batched product).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import math

__all__ = ["BlockGroup", "TreePlan", "group_blocks", "stack", "unstack", "contraction", "update_factors",
           "precondition", "rotate"]


@dataclass(frozen=True)
class BlockGroup:
    """Blocks of one ``shape`` and ``mask``: ``members[k] = (leaf, block)`` in tree order."""

    shape: tuple
    mask: tuple
    exponent: float
    members: tuple


@dataclass(frozen=True)
class TreePlan:
    """The groups of a tree; ``where[(leaf, block)] = (group index, position in the group)``."""

    groups: tuple
    where: dict


def group_blocks(plans) -> TreePlan:
    """Group the blocks of the leaves' :class:`~arrayopt.shampoo.blocking.LeafPlan` s by shape and mask."""
    by_key: dict = {}
    for i, plan in enumerate(plans):
        if plan.skipped:
            continue
        for b, shape in enumerate(plan.block_shapes()):
            by_key.setdefault((shape, plan.mask, plan.exponent), []).append((i, b))
    groups = tuple(BlockGroup(s, m, e, tuple(mem)) for (s, m, e), mem in by_key.items())
    where = {ib: (gi, k) for gi, g in enumerate(groups) for k, ib in enumerate(g.members)}
    return TreePlan(groups, where)


def stack(xp, arrays):
    """``(n, ...)`` from ``n`` arrays of one shape (a view-free copy; one array gets a new axis)."""
    return arrays[0][None, ...] if len(arrays) == 1 else xp.stack(arrays)


def stack_readonly(xp, arrays):
    """:func:`stack` for a stack that is only read: arrays that are exactly the members of one stack,
    in order (what :func:`unstack` gave the last step's factors), give that stack back, no copy."""
    base = _stack_of(arrays) if len(arrays) > 1 else None
    return base if base is not None else stack(xp, arrays)


def _stack_of(arrays):
    """The stack whose members (``base[k]``, in order) ``arrays`` are, else ``None`` (NumPy and torch)."""
    first = arrays[0]
    base = getattr(first, "_base", None)  # torch
    if base is not None and hasattr(first, "storage_offset"):
        if base.shape[0] != len(arrays) or tuple(base.shape[1:]) != tuple(first.shape) or base.dtype != first.dtype \
                or not base.is_contiguous() or base.storage_offset() != 0:
            return None
        step = base.stride(0)
        for k, a in enumerate(arrays):
            if a._base is not base or a.storage_offset() != k * step or a.stride() != base.stride()[1:]:
                return None
        return base
    base = getattr(first, "base", None)  # NumPy
    if isinstance(base, np.ndarray) and type(first) is np.ndarray:
        if base.shape[0] != len(arrays) or base.shape[1:] != first.shape or base.dtype != first.dtype \
                or not base.flags.c_contiguous:
            return None
        start, step = base.__array_interface__["data"][0], base.strides[0]
        for k, a in enumerate(arrays):
            if a.base is not base or a.__array_interface__["data"][0] != start + k * step or a.strides != base.strides[1:]:
                return None
        return base
    return None


def unstack(x) -> list:
    """The members of a stack (views; one call for NumPy and torch)."""
    if hasattr(x, "unbind"):  # torch
        return list(x.unbind(0))
    if isinstance(x, np.ndarray) and x.ndim > 1:  # (iterating a vector would give scalars)
        return list(x)
    return [x[k, ...] for k in range(x.shape[0])]


def _unfold(xp, g, axis: int):
    """``(n, d_axis, rest)``: the mode-``axis`` unfolding of each member of stack ``g``."""
    nd = len(g.shape) - 1
    if axis != 0:
        perm = (0, axis + 1) + tuple(i + 1 for i in range(nd) if i != axis)
        g = xp.permute_dims(g, perm)
    return xp.reshape(g, (g.shape[0], g.shape[1], -1))


def contraction(xp, g, axis: int):
    """``G_i^{(axis)} G_i^{(axis)ᵀ}`` of every member of stack ``g`` (``(n, d, d)``)."""
    nd = len(g.shape) - 1
    if nd == 2 and axis == 1:
        return xp.matmul(xp.matrix_transpose(g), g)
    m = _unfold(xp, g, axis)
    return xp.matmul(m, xp.matrix_transpose(m))


def update_factors(xp, factors, g, mask, b2: float):
    """New stacked factors (one ``(n, d, d)`` per preconditioned axis) of stack ``g``."""
    return math.update_factors(xp, factors, g, mask, b2, contract=contraction)


def _contract_first(xp, g, mat, *, transpose: bool):
    """Stack ``g`` (``(n, a0, a1, ...)``) contracted on ``a0`` with ``mat`` (``(n, a0, b)``; its
    transpose when ``transpose``), the new axis last: ``(n, a1, ..., b)`` (``tensordot`` per member)."""
    n, a0 = g.shape[0], g.shape[1]
    rest = tuple(g.shape[2:])
    x = xp.matrix_transpose(xp.reshape(g, (n, a0, -1)))
    y = xp.matmul(x, xp.matrix_transpose(mat) if transpose else mat)
    return xp.reshape(y, (n,) + rest + (y.shape[-1],))


def _rotate_axis(xp, g):
    nd = len(g.shape) - 1
    return xp.permute_dims(g, (0,) + tuple(range(2, nd + 1)) + (1,))


def precondition(xp, g, roots, mask):
    """``G_i ×_1 R_i^{(1)} ⋯ ×_k R_i^{(k)}`` for every member of stack ``g`` (``roots``: stacked)."""
    nd = len(g.shape) - 1
    if nd == 1:
        return xp.matmul(roots[0], g[..., None])[..., 0]
    if nd == 2 and mask == (True, True):
        return xp.matmul(xp.matmul(roots[0], g), roots[1])
    j = 0
    for m in mask:
        if m:
            g = _contract_first(xp, g, roots[j], transpose=False)
            j += 1
        else:
            g = _rotate_axis(xp, g)
    return g


def rotate(xp, g, bases, mask, *, back: bool = False):
    """``Ĝ_i = G_i ×_j Q_jᵀ`` of every member (``back=True``: ``G_i ×_j Q_j``), as
    :func:`arrayopt.shampoo.math.rotate_block`."""
    nd = len(g.shape) - 1
    t = xp.matrix_transpose
    if nd == 1:
        q = bases[0]
        return xp.matmul(q, g[..., None])[..., 0] if back else xp.matmul(g[:, None, :], q)[:, 0, :]
    if nd == 2 and mask == (True, True):
        ql, qr = bases
        return xp.matmul(xp.matmul(ql, g), t(qr)) if back else xp.matmul(xp.matmul(t(ql), g), qr)
    if nd == 2 and mask == (False, True):
        return xp.matmul(g, t(bases[0]) if back else bases[0])
    if nd == 2 and mask == (True, False):
        return xp.matmul(bases[0] if back else t(bases[0]), g)
    j = 0
    for m in mask:
        if m:
            g = _contract_first(xp, g, bases[j], transpose=back)
            j += 1
        else:
            g = _rotate_axis(xp, g)
    return g
