"""The fused step split by leaf: the leaves a backend takes run its kernel, the others the reference.

For an optimizer whose step is independent per leaf (``per_leaf_dispatch``: the first-order
optimizers, SONew), :func:`arrayopt.dispatch.choose_leaves` says per leaf whether the
backend takes its arrays (a float16 leaf, a layout the kernel does not read go to the
reference). :func:`split_step` then runs, in this order, so that a rejected step writes
nothing:

1. one finiteness decision for the whole step: the backend's pre-pass on the kernel leaves'
   gradients and one array-API reduction over the others;
2. the reference on its leaves, computed but not written, and its update checked;
3. the kernel in place on its leaves (or, where the inputs are out of the kernel's range or
   the kernel met a non-finite value before writing, the reference on them too, checked);
4. the reference's new params written.

The per-leaf entries of the two partial states are merged back into one state in leaf order.
"""

from __future__ import annotations

import array_api_compat as compat

from . import _validate
from ._state_use import _copy_state

__all__ = ["split_step", "substate", "merge", "write_params"]


def _writeable_inplace(ns, leaves) -> bool:
    if ns.library not in ("numpy", "torch", "cupy"):
        return False
    return all(compat.is_writeable_array(p) for p in leaves)


def write_params(ns, leaves, new_leaves):
    """Write ``new_leaves`` into ``leaves`` in place when writeable; return the leaves to hand back."""
    if not _writeable_inplace(ns, leaves):
        return list(new_leaves)
    if ns.library == "torch":
        import torch

        with torch.no_grad():
            for p, q in zip(leaves, new_leaves):
                p.copy_(q)
    else:
        for p, q in zip(leaves, new_leaves):
            p[...] = q
    return list(leaves)


def substate(opt, state: dict, idx: list, n_leaves: int, per_leaf: list) -> dict:
    """A shallow copy of ``state`` whose per-leaf entries hold the leaves ``idx`` only."""
    sub = _copy_state(state)
    for k in per_leaf:
        sub[k] = [state[k][i] for i in idx]
    return sub


def merge(state: dict, parts: list, n_leaves: int, per_leaf: list) -> dict:
    """One state from ``parts = [(idx, new_substate)]``: the first part's header and other entries,
    each per-leaf entry merged in leaf order (its container type kept)."""
    new = _copy_state(parts[0][1])
    for k in per_leaf:
        merged = [None] * n_leaves
        for idx, sub in parts:
            for i, v in zip(idx, sub[k]):
                merged[i] = v
        new[k] = type(state[k])(merged)
    return new


def split_step(opt, backend, step, refusals, ns, leaves, g_leaves, state, paths, **kw):
    """The step with the leaves ``refusals[i] is None`` on ``backend``, the others on the reference.

    Returns ``(new leaves, new state)`` or ``None`` (a skipped non-finite step); nothing is
    written before the finiteness of every gradient and of the reference's update is known.
    """
    n = len(leaves)
    k_idx = [i for i in range(n) if refusals[i] is None]
    r_idx = [i for i in range(n) if refusals[i] is not None]
    per_leaf = opt._per_leaf_keys(state, n)

    def pick(seq, idx):
        return [seq[i] for i in idx]

    kl, kg, kp = pick(leaves, k_idx), pick(g_leaves, k_idx), pick(paths, k_idx)
    rl, rg, rp = pick(leaves, r_idx), pick(g_leaves, r_idx), pick(paths, r_idx)
    k_state = substate(opt, state, k_idx, n, per_leaf)
    r_state = substate(opt, state, r_idx, n, per_leaf)
    views = backend.views(kg)
    plan = opt._kernel_plan(ns, kl, kg, k_state, kp, **kw)
    finite = backend.all_finite(opt._prepass_views(views, plan)) and _validate.all_finite(ns.xp, rg)
    if not finite:
        opt._handle_nonfinite(ns.xp, g_leaves, paths)
        return None
    r_new, r_state = opt._reference_step(ns, rl, rg, r_state, rp, **kw)
    if not opt._finite_update(ns, r_new, rp):
        return None
    k_new = None
    if opt._in_range(ns, views, plan):
        new_k_state = opt._run_kernel(backend, step, views, plan, ns, kl, kg, k_state, kp, **kw)
    else:
        new_k_state = None
    if new_k_state is None:  # the reference on the kernel's leaves too, checked before any write
        k_new, new_k_state = opt._reference_step(ns, kl, kg, k_state, kp, **kw)
        if not opt._finite_update(ns, k_new, kp):
            return None
        k_new = write_params(ns, kl, k_new)
    r_new = write_params(ns, rl, r_new)
    out = list(leaves)
    for i, v in zip(r_idx, r_new):
        out[i] = v
    if k_new is not None:
        for i, v in zip(k_idx, k_new):
            out[i] = v
    return out, merge(state, [(k_idx, new_k_state), (r_idx, r_state)], n, per_leaf)
