r"""Sketchy's per-axis work on stacks: the leaves of one merged shape update and apply together.

A tree's preconditioned leaves are grouped once by their merged shape, sketch ranks and state
dtype (:func:`plan_tree`, a pure function of the leaves' shapes and dtypes). Each group of small
leaves (at most :data:`STACK_MAX_SIZE` entries each) is stacked into ``G ∈ R^{B × d_1 × … × d_k}``
and every axis ``i`` takes one batched Frequent-Directions update
(:func:`~arrayopt.sketchy.math.fd_update_stacked`: one batched QR and SVD for the ``B``
unfoldings ``G_{b,(i)}``) and one batched low-rank apply
(:func:`~arrayopt.sketchy.math.apply_factors_stacked`), so a tree of many small leaves costs
a few array calls per group, not per leaf. A larger leaf is a group of its own, taken as a
stack of one without a copy. Each leaf's result is the one it gets alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .math import apply_factors_stacked, fd_update_stacked, inverse_factors

__all__ = ["TreePlan", "SketchGroup", "plan_tree", "sketch_groups", "precondition_groups", "STACK_MAX_SIZE"]

#: leaves with at most this many entries are stacked with the other leaves of their shape
STACK_MAX_SIZE = 1 << 16


@dataclass(frozen=True)
class SketchGroup:
    """Preconditioned leaves ``leaves`` (indices into the tree) of one merged ``shape``, sketch
    ``ranks`` and ``alpha = 1/(2k)``."""

    shape: tuple
    ranks: tuple
    alpha: float
    leaves: tuple


@dataclass(frozen=True)
class TreePlan:
    """The groups of a tree's preconditioned leaves (graft-only leaves are in none)."""

    groups: tuple


def plan_tree(plans, dtype_names) -> TreePlan:
    """Group leaves by ``(merged shape, ranks, state dtype)``; ``plans`` are the leaves'
    :class:`~arrayopt.sketchy.optimizer.SketchPlan`, ``dtype_names`` their state dtypes."""
    keyed: dict = {}
    groups = []
    for i, (plan, dt) in enumerate(zip(plans, dtype_names)):
        if plan.skipped:
            continue
        if math.prod(plan.shape) > STACK_MAX_SIZE:
            groups.append(SketchGroup(plan.shape, plan.ranks, plan.alpha, (i,)))
            continue
        keyed.setdefault((plan.shape, plan.ranks, dt), []).append(i)
    for (shape, ranks, _), idx in keyed.items():
        groups.append(SketchGroup(shape, ranks, 1.0 / (2 * len(shape)), tuple(idx)))
    return TreePlan(tuple(groups))


def _stack(xp, arrays):
    if len(arrays) == 1:
        return arrays[0][None, ...]
    return xp.stack(arrays)


def _unstack(xp, a, n):
    if n == 1:
        return [a[0, ...]]
    return list(xp.unstack(a))


def _stacked_grads(xp, group, g_leaves):
    return _stack(xp, [xp.reshape(g_leaves[i], group.shape) for i in group.leaves])


def _unfold(xp, g, axis: int):
    """The mode-``axis`` unfoldings of a stack ``(B, d_1, …)``: ``(B, d_axis, rest)``."""
    nd = len(g.shape)
    if axis != 0:
        g = xp.permute_dims(g, (0, axis + 1) + tuple(i for i in range(1, nd) if i != axis + 1))
    return xp.reshape(g, (g.shape[0], g.shape[1], -1))


def sketch_groups(xp, cfg, tree: TreePlan, g_leaves, per_leaf_axes):
    """FD updates of every group: ``per_leaf_axes[i]`` (the leaf's per-axis ``[U, σ̄, ι, ρ, ι_ρ]``)
    is replaced for the grouped leaves; returns the ``ok`` stacks (one per group and axis)."""
    oks = []
    for group in tree.groups:
        g = _stacked_grads(xp, group, g_leaves)
        n = len(group.leaves)
        for axis in range(len(group.shape)):
            u, sv, tail = (_stack(xp, [per_leaf_axes[i][axis][j] for i in group.leaves]) for j in (0, 1, 3))
            s = fd_update_stacked(u, sv, tail, _unfold(xp, g, axis), beta2=cfg.b2, tail_decay=cfg.tail_decay,
                                  x_finite=True)  # the step checked its gradients first
            inv, inv_tail = inverse_factors(s.undeflated, s.tail, alpha=group.alpha, eps=cfg.eps,
                                            relative=cfg.relative_eps, mask=s.sv > 0)
            cols = [_unstack(xp, a, n) for a in (s.eigvecs, s.sv, inv, s.tail, inv_tail)]
            for b, i in enumerate(group.leaves):
                per_leaf_axes[i][axis] = [c[b] for c in cols]
            oks.append(s.ok)
    return oks


def precondition_groups(xp, tree: TreePlan, g_leaves, per_leaf_axes):
    """``{leaf index: D}`` of every grouped leaf (the leaf's shape): cyclic batched mode products."""
    out = {}
    for group in tree.groups:
        g = _stacked_grads(xp, group, g_leaves)
        nd = len(group.shape)
        for axis in range(nd):
            u, inv, inv_tail = (_stack(xp, [per_leaf_axes[i][axis][j] for i in group.leaves]) for j in (0, 2, 4))
            shape = tuple(g.shape)
            g = xp.reshape(apply_factors_stacked(xp, u, inv, inv_tail, xp.reshape(g, (shape[0], shape[1], -1))),
                           shape)
            if nd > 1:
                g = xp.permute_dims(g, (0,) + tuple(range(2, nd + 1)) + (1,))
        for i, d in zip(group.leaves, _unstack(xp, g, len(group.leaves))):
            out[i] = xp.reshape(d, tuple(g_leaves[i].shape))
    return out
