"""Shampoo's state check: every entry a step reads, with a named error for what is wrong (one fast
pass over the factor trees when they are right, the detailed checks only when it fails)."""

from __future__ import annotations

import numpy as np

from .. import _validate
from .._xp import dtype_name
from ..sketchy.step import check_tail_state, tail_keys
from .async_roots import job_result

__all__ = ["check_state"]


def _layout(opt, plan, corrected: bool):
    """``(factors per block, flat factor shapes)`` of a leaf plan (per block one second moment
    when ``corrected``), cached per plan."""
    key = (id(plan), corrected)
    out = opt._layouts.get(key)
    if out is None:
        per_block = [[s] for s in plan.block_shapes()] if corrected else plan.factor_shapes()
        out = opt._layouts.setdefault(key, (tuple(len(b) for b in per_block),
                                             tuple(tuple(s) for b in per_block for s in b)))
    return out


def _factors_fast(opt, ns, corrected, tree, plans, dtypes) -> bool:
    """Whether every array of a per-leaf factor tree is a plain array of the call's library and
    device with its plan's layout, shape and dtype, read in one pass (``False``: the detailed
    checks of :func:`check_state` run and name what is wrong)."""
    arrays, shapes, kinds = [], [], []
    for plan, dt, per_leaf in zip(plans, dtypes, tree):
        counts, flat = _layout(opt, plan, corrected)
        if type(per_leaf) is not list or len(per_leaf) != len(counts):
            return False
        if corrected:
            arrays += per_leaf
        else:
            for blk, n in zip(per_leaf, counts):
                if type(blk) is not list or len(blk) != n:
                    return False
                arrays += blk
        shapes += flat
        kinds += [dt] * len(flat)
    return len(arrays) == len(shapes) and _validate._fast_like(arrays, shapes, kinds, ns)


def check_state(opt, ns, leaves, paths, state, params_missing):
    """Raise a named error for a state this optimizer cannot step (missing entries, factor shapes,
    dtypes, devices, counters, a lost or failed root job); nothing is changed."""
    cfg = opt.config
    keys = list(opt._factor_trees) + (["second_moment"] if cfg.eigenvalue_corrected else []) + \
        tail_keys(cfg) + list(opt._counters) + ["pending"]
    dtypes = check_tail_state("shampoo", cfg, ns, leaves, paths, state, params_missing, keys)
    plans = [opt.plan(p.shape) for p in leaves]
    trees = [(n, lambda plan: plan.factor_shapes()) for n in opt._factor_trees]
    if cfg.eigenvalue_corrected:
        trees.append(("second_moment", lambda plan: [[s] for s in plan.block_shapes()]))
    for name, layout in trees:
        tree = state[name]
        if not isinstance(tree, list) or len(tree) != len(leaves):
            raise ValueError(f"state[{name!r}]: expected a list of {len(leaves)} entries (one per leaf)")
        if _factors_fast(opt, ns, name == "second_moment", tree, plans, dtypes):
            continue
        arrays, where, kinds = [], [], []  # every factor of the tree, checked in one call
        for p, plan, path, dt, per_leaf in zip(leaves, plans, paths, dtypes, tree):
            want = layout(plan)
            if name == "second_moment" and isinstance(per_leaf, list):
                per_leaf = [[b] for b in per_leaf]
            got = [[tuple(f.shape) for f in blk] if isinstance(blk, list) else None for blk in per_leaf] \
                if isinstance(per_leaf, list) else None
            if got != [[tuple(s) for s in blk] for blk in want]:
                raise ValueError(f"state[{name!r}] leaf {path}: shapes {got} do not match "
                                 f"the blocks of params shape {tuple(p.shape)} ({want})")
            for blk in per_leaf:
                for f in blk:
                    if ns.library != "numpy" or not isinstance(f, np.ndarray):
                        arrays.append(f)
                        where.append(path)
                        kinds.append(dt)
                    elif f.dtype != dt:
                        raise TypeError(f"state[{name!r}] leaf {path}: dtype {dtype_name(f.dtype)}, "
                                        f"expected {dtype_name(dt)}")
        if arrays:
            _validate.check_state_leaves(name, arrays, where, ns, arrays, kinds)
    for k in opt._counters:
        v = state[k]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"state[{k!r}]: expected an int, got {v!r}")
    pend = state["pending"]
    if pend is not None:
        if not isinstance(pend, dict) or set(pend) != {"install_at", "stats_step", "result"}:
            raise ValueError("state['pending']: expected None or the dict of a pending root job")
        if pend["result"] is None and getattr(state, "_future", None) is None:
            raise ValueError("state['pending']: a root job is in flight but its future was lost "
                             "(the state was copied into a plain dict); use the state returned by "
                             "update()/step(), or save_state() it to settle the job")
        fut = getattr(state, "_future", None)
        if fut is not None and fut.done() and fut.exception() is not None:
            job_result(fut, pend["stats_step"])  # raises with a clear message
