"""The optimizers whose update traces into a jitted optax step, as JAX code.

:func:`traced_update` runs an optimizer's array-API reference on the traced JAX arrays of the
step: the step count is a traced 0-d integer array, and every per-step scalar (the learning
rate of a schedule, the bias corrections ``1 - β^t``) is computed from it by array ops in the
params' compute dtype. Branches are on hyperparameters only (fixed at construction). A traced
step cannot raise, so a non-finite gradient skips the step: the updates are zero, the state
keeps its arrays, ``nonfinite_skipped`` counts it (as ``on_nonfinite="skip"`` on the host).
"""

from __future__ import annotations

import jax
import numpy as np

from .. import _validate
from .._xp import Namespace, is_low_precision, namespace_of, state_dtype
from ..base import HEADER, ElementwiseOptimizer
from ..schedules import array_value
from ..sonew import SONew

__all__ = ["needs_params", "traced_update", "traces"]


def traces(opt) -> bool:
    """Whether ``opt``'s update runs traced (else the adapter runs it on the host)."""
    if isinstance(opt, SONew):
        return True
    if isinstance(opt, ElementwiseOptimizer):
        return hasattr(opt, "array_step_scalars")
    return _shampoo_traces(opt)


def needs_params(opt) -> bool:
    """Whether ``opt`` (one that :func:`traces`) needs the params in ``update`` (weight decay)."""
    config = getattr(opt, "config", opt)
    return config.weight_decay != 0.0


def traced_update(opt, g_leaves, p_leaves, state: dict):
    """``(updates, new_state)`` of ``opt`` traced in JAX, or ``None`` if it runs on the host
    (an optimizer without a traced form, or leaves of more than one compute dtype).

    ``state``: the arrayopt state with traced 0-d arrays for its numbers.
    """
    if not traces(opt):
        return None
    xp = namespace_of(g_leaves[0])
    dtypes = {state_dtype(xp, g.dtype) for g in g_leaves}
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    params = p_leaves if p_leaves else g_leaves
    if isinstance(opt, SONew):
        core = _sonew
    elif isinstance(opt, ElementwiseOptimizer):
        core = _elementwise
    else:
        core = _shampoo
    updates, new = core(opt, xp, dtype, params, g_leaves, state)
    return _skip_if_nonfinite(xp, g_leaves, updates, state, new)


def _learning_rate(learning_rate, xp, count, dtype):
    """``η`` at the traced ``count`` by array ops; a schedule that cannot take an array (Python
    math on its step) is evaluated on the host through ``jax.pure_callback``."""
    try:
        return array_value(learning_rate, xp, count, dtype)
    except TypeError:  # jax's concretization errors are TypeErrors
        spec = jax.ShapeDtypeStruct((), dtype)
        return jax.pure_callback(
            lambda c: np.asarray(_validate.learning_rate_at(learning_rate, int(c)), dtype), spec, count)


def _skip_if_nonfinite(xp, g_leaves, updates, state, new):
    """Zero updates and the old state where a gradient holds NaN/Inf; the header advanced."""
    ok = xp.all(xp.stack([xp.all(xp.isfinite(g)) for g in g_leaves]))
    updates = [xp.where(ok, u, xp.zeros_like(u)) for u in updates]
    kept = {k: jax.tree_util.tree_map(lambda a, b: xp.where(ok, a, b), new[k], state[k])
            for k in new if k not in HEADER}
    new = dict(new, **kept)
    count = state["count"]
    new["count"] = count + xp.astype(ok, count.dtype)
    new["nonfinite_skipped"] = state["nonfinite_skipped"] + xp.astype(~ok, count.dtype)
    new["consumed"] = state["consumed"]
    return updates, new


def _to_compute(xp, x):
    return xp.astype(x, xp.float32) if is_low_precision(x.dtype) else x


def _to_param(xp, u, p):
    return xp.astype(u, p.dtype) if is_low_precision(p.dtype) else u


def _elementwise(opt: ElementwiseOptimizer, xp, dtype, params, g_leaves, state):
    """SGD, Adam/AdamW, AdaGrad: ``reference`` per leaf with ``array_step_scalars``."""
    count = state["count"]
    lr = _learning_rate(opt.learning_rate, xp, count, dtype)
    scalars = opt.array_step_scalars(xp, xp.astype(count + 1, dtype), lr)
    updates, per_name = [], {n: [] for n in opt.state_names}
    for i, (p, g) in enumerate(zip(params, g_leaves)):
        p32, g32 = _to_compute(xp, p), _to_compute(xp, g)
        p_new, states = opt.reference(xp, p32, g32, [state[n][i] for n in opt.state_names], scalars)
        updates.append(_to_param(xp, p_new - p32, p))
        for n, s in zip(opt.state_names, states):
            per_name[n].append(s)
    return updates, dict(state, **per_name)


def _sonew(opt: SONew, xp, dtype, params, g_leaves, state):
    """SONew's reference with a step description whose ``η``, ``1 - β₁^t``, ``1 - β₂^t`` are traced."""
    count = state["count"]
    lr = _learning_rate(opt.learning_rate, xp, count, dtype)
    t = xp.astype(count + 1, dtype)
    bc1 = 1.0 - xp.pow(xp.full_like(t, opt.b1), t)
    bc2 = 1.0 - xp.pow(xp.full_like(t, opt.b2), t)
    step = opt._template.with_scalars(lr, bc1, bc2)
    updates, new = opt._reference_all(Namespace(xp, None, "jax"), params, g_leaves, state, step=step)
    return [_to_param(xp, u, p) for u, p in zip(updates, params)], new


def _shampoo_traces(opt) -> bool:
    return False


def _shampoo(opt, xp, dtype, params, g_leaves, state):  # pragma: no cover - filled in below
    raise NotImplementedError
