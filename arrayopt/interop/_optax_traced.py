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

from .. import _validate, grafting
from .._xp import Namespace, is_low_precision, namespace_of, state_dtype
from ..base import HEADER, ElementwiseOptimizer
from ..chain import Chain
from ..linalg.roots import eigh_inverse_pth_root
from ..momentum import heavy_ball_update
from ..schedules import array_value
from ..shampoo.blocking import merge, split
from ..shampoo.optimizer import Shampoo
from ..shampoo.math import precondition_block, update_factors
from ..sonew import SONew
from ..transforms import ClipByGlobalNorm, Scale

__all__ = ["check_carriable", "needs_params", "traced_update", "traces"]


def traces(opt) -> bool:
    """Whether ``opt``'s update runs traced (else the adapter runs it on the host)."""
    if isinstance(opt, (SONew, Scale, ClipByGlobalNorm)):
        return True
    if isinstance(opt, ElementwiseOptimizer):
        return hasattr(opt, "array_step_scalars")
    if isinstance(opt, Chain):
        return all(traces(part) for part in opt.parts)
    return _shampoo_traces(opt)


def needs_params(opt) -> bool:
    """Whether ``opt`` (one that :func:`traces`) needs the params in ``update`` (weight decay)."""
    if isinstance(opt, Chain):
        return any(needs_params(part) for part in opt.parts)
    config = getattr(opt, "config", opt)
    return getattr(config, "weight_decay", 0.0) != 0.0


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
    ok = xp.all(xp.stack([xp.all(xp.isfinite(g)) for g in g_leaves]))
    updates, new = _core(opt, xp, dtype, p_leaves if p_leaves else None, g_leaves, state)
    updates = [xp.where(ok, u, xp.zeros_like(u)) for u in updates]
    return updates, _kept_if_skipped(opt, xp, ok, new, state)


def _core(opt, xp, dtype, params, g_leaves, state):
    """``(updates, new_state)`` of one traced step, the header not yet advanced; ``params``
    ``None``: the gradients stand in for them (as in ``update(grads, state)``)."""
    if isinstance(opt, Chain):
        return _chain(opt, xp, dtype, params, g_leaves, state)
    if isinstance(opt, Scale):
        return [g * opt.factor for g in g_leaves], state
    if isinstance(opt, ClipByGlobalNorm):
        return _clip(opt, xp, g_leaves), state
    params = g_leaves if params is None else params
    if isinstance(opt, SONew):
        return _sonew(opt, xp, dtype, params, g_leaves, state)
    if isinstance(opt, ElementwiseOptimizer):
        return _elementwise(opt, xp, dtype, params, g_leaves, state)
    return _shampoo(opt, xp, dtype, params, g_leaves, state)


def _learning_rate(learning_rate, xp, count, dtype):
    """``η`` at the traced ``count`` by array ops; a schedule that cannot take an array (Python
    math on its step) is evaluated on the host through ``jax.pure_callback``."""
    try:
        return array_value(learning_rate, xp, count, dtype)
    except TypeError:  # jax's concretization errors are TypeErrors
        spec = jax.ShapeDtypeStruct((), dtype)
        return jax.pure_callback(
            lambda c: np.asarray(_validate.learning_rate_at(learning_rate, int(c)), dtype), spec, count)


def _kept_if_skipped(opt, xp, ok, new, old, first: bool = True):
    """The new state where ``ok`` (finite gradients), else the old arrays; the header advanced:
    ``count`` by ``ok``, ``nonfinite_skipped`` by ``not ok`` (in a chain, its first part's only,
    as a chain skips a step in its first part and leaves the later parts as they were)."""
    out = dict(new)
    for k in new:
        if k == "count":
            out[k] = old[k] + xp.astype(ok, old[k].dtype)
        elif k == "nonfinite_skipped":
            out[k] = old[k] + xp.astype(~ok, old[k].dtype) if first else old[k]
        elif k in HEADER:
            out[k] = old[k]
        elif k == "inner" and isinstance(opt, Chain):
            out[k] = [_kept_if_skipped(part, xp, ok, n, o, first and i == 0)
                      for i, (part, n, o) in enumerate(zip(opt.parts, new[k], old[k]))]
        else:
            out[k] = jax.tree_util.tree_map(lambda a, b: xp.where(ok, a, b), new[k], old[k])
    return out


def _chain(opt: Chain, xp, dtype, params, g_leaves, state):
    """Each part's traced step on the previous part's updates."""
    updates, inner = g_leaves, []
    for part, s in zip(opt.parts, state["inner"]):
        updates, s = _core(part, xp, dtype, params, updates, s)
        inner.append(s)
    return updates, dict(state, inner=inner)


def _clip(opt: ClipByGlobalNorm, xp, g_leaves):
    """``g · min(1, c / ‖g‖₂)`` (``‖g‖₂`` over all leaves, in float32 or wider; 1 when ``‖g‖ = 0``)."""
    sq = [xp.sum(g * g) if g.dtype in (xp.float32, xp.float64) else xp.sum(xp.astype(g, xp.float32) ** 2)
          for g in g_leaves]
    total = xp.sqrt(sum(sq[1:], sq[0]))
    safe = xp.where(total > 0, total, xp.ones_like(total))
    factor = xp.where(total > 0, xp.minimum(opt.max_norm / safe, xp.ones_like(total)), xp.ones_like(total))
    return [g * xp.astype(factor, g.dtype) for g in g_leaves]


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


def check_carriable(opt) -> None:
    """Raise if ``opt`` keeps work in flight between steps, which no jitted step can carry: a
    Shampoo with an executor or ``root_delay > 0`` (its pending root job)."""
    if isinstance(opt, Shampoo) and (opt.executor is not None or opt.delay > 0):
        raise ValueError(
            f"opt: {opt.name} with an executor or root_delay > 0 keeps a pending root job in its state, "
            f"which a jitted optax step cannot carry; use executor=None and root_delay=0 (the roots are "
            f"then computed inside the step, traced with jax.lax.cond on the step count)")


def _shampoo_traces(opt) -> bool:
    """Shampoo with synchronous ``eigh`` roots on one process, root-inverse preconditioning."""
    if not isinstance(opt, Shampoo):
        return False
    cfg = opt.config
    return (opt.executor is None and opt.comm.size == 1 and opt.delay == 0
            and cfg.preconditioner == "root_inverse" and cfg.root_method == "eigh")


def _root_dtype(xp, name: str):
    """The roots' compute dtype: ``root_dtype``, float32 where JAX has no float64 (x64 off)."""
    return getattr(xp, name) if name == "float32" or jax.config.jax_enable_x64 else xp.float32


def _refresh_roots(opt: Shampoo, xp, params, stats, roots):
    """New roots of every factor by :func:`eigh_inverse_pth_root`, one batched ``eigh`` per
    (size, exponent) (a non-finite root keeps the old one), and the number of such failures.

    The groups' ``eigh`` calls run one at a time: group ``k`` in iteration ``k`` of a
    ``jax.lax.fori_loop`` whose body selects it with ``jax.lax.switch``. Independent LAPACK
    custom calls that XLA's CPU runtime runs concurrently can deadlock in its LAPACK
    kernels; in a loop no two of them are ever in flight, and each group's arithmetic is
    the same as a direct call's.
    """
    cfg = opt.config
    dt = _root_dtype(xp, cfg.root_dtype)
    flat, old = opt._flat_factors(stats), opt._flat_factors(roots)
    groups: dict = {}
    for i, (f, p) in enumerate(zip(flat, opt._exponents(params))):
        groups.setdefault((tuple(f.shape), p), []).append(i)
    order = list(groups.items())
    stacked = [xp.stack([xp.astype(flat[i], dt) for i in idx]) for _, idx in order]

    def group_root(k):
        def branch(results):
            (_, p), _ = order[k]
            r, ok = eigh_inverse_pth_root(xp, stacked[k], p, cfg.eps, cfg.relative_epsilon)
            return results[:k] + ((r, ok),) + results[k + 1:]
        return branch

    empty = tuple((xp.zeros_like(a), xp.zeros(a.shape[:1], dtype=xp.bool)) for a in stacked)
    branches = [group_root(k) for k in range(len(order))]
    results = jax.lax.fori_loop(0, len(order), lambda k, res: jax.lax.switch(k, branches, res), empty)
    new, failures = list(old), []
    for (_, idx), (r, ok) in zip(order, results):
        for j, i in enumerate(idx):
            new[i] = xp.where(ok[j], xp.astype(r[j], old[i].dtype), old[i])
        failures.append(xp.sum(xp.astype(~ok, xp.int32)))
    it = iter(new)
    return [[[next(it) for _ in blk] for blk in per_leaf] for per_leaf in roots], sum(failures)


def _shampoo(opt: Shampoo, xp, dtype, params, g_leaves, state):
    """Shampoo's ``_update`` with a traced count: the statistics every step (or on the steps
    ``t % statistics_every == 0``, by ``where``), the roots under ``jax.lax.cond`` on
    ``t ≥ t₀ ∧ (t - t₀) mod F = 0``, the grafting direction alone until the first roots."""
    cfg = opt.config
    count = state["count"]
    t_int = count + 1
    t = xp.astype(t_int, dtype)
    lr = _learning_rate(cfg.learning_rate, xp, count, dtype)
    g32 = [_to_compute(xp, g) for g in g_leaves]
    stats = []
    for p, g, per_leaf in zip(params, g32, state["stats"]):
        plan = opt.plan(p.shape)
        if plan.skipped:
            stats.append(per_leaf)
            continue
        blocks = split(xp, xp.reshape(g, plan.shape), plan.blocks)
        new = [update_factors(xp, fs, b, plan.mask, cfg.b2) for fs, b in zip(per_leaf, blocks)]
        if cfg.statistics_every != 1:
            due = t_int % cfg.statistics_every == 0
            new = jax.tree_util.tree_map(lambda a, b: xp.where(due, a, b), new, per_leaf)
        stats.append(new)
    counters = {k: state[k] for k in opt._counters}
    roots = state["roots"]
    if opt._flat_factors(stats):
        start, every = cfg.start_preconditioning_step, cfg.precondition_every
        due = (t_int >= start) & ((t_int - start) % every == 0)

        def refresh(operand):
            old_roots, c = operand
            new_roots, failures = _refresh_roots(opt, xp, params, stats, old_roots)
            c = dict(c, roots_step=xp.astype(t_int, c["roots_step"].dtype), root_jobs=c["root_jobs"] + 1,
                     root_failures=c["root_failures"] + xp.astype(failures, c["root_failures"].dtype))
            return new_roots, c

        roots, counters = jax.lax.cond(due, refresh, lambda operand: operand, (roots, counters))
    active = counters["roots_step"] > 0
    counters["root_staleness"] = xp.where(active, t_int - counters["roots_step"],
                                          xp.full_like(counters["roots_step"], -1))
    new_graft, new_mom, updates = [], [], []
    kind = "sgd" if cfg.graft.type == "none" else cfg.graft.type
    for i, (p, g) in enumerate(zip(params, g32)):
        plan = opt.plan(p.shape)
        acc = state["graft"][i] if cfg.graft.has_state else None
        u_g, acc = grafting.direction(xp, kind, g, acc, t, b2=cfg.graft.b2, eps=cfg.graft.eps)
        if acc is not None:
            new_graft.append(acc)
        u = u_g
        if not plan.skipped:
            blocks = split(xp, xp.reshape(g, plan.shape), plan.blocks)
            d_blocks = [precondition_block(xp, b, rs, plan.mask) for b, rs in zip(blocks, roots[i])]
            if cfg.graft.type != "none" and cfg.graft.per == "block":
                a_blocks = split(xp, xp.reshape(u_g, plan.shape), plan.blocks)
                d_blocks = grafting.graft_blocks(xp, d_blocks, a_blocks, per="block")
            d = xp.reshape(merge(xp, d_blocks, plan.shape, cfg.block_size), tuple(p.shape))
            d = d if cfg.graft.type == "none" or cfg.graft.per == "block" else grafting.graft(xp, d, u_g)
            u = xp.where(active, d, u_g)
        p32 = _to_compute(xp, p) if cfg.weight_decay != 0.0 else None
        upd, m = heavy_ball_update(xp, u, state["momentum"][i] if cfg.b1 > 0 else None, p32, b1=cfg.b1,
                                   ema=cfg.ema_momentum, nesterov=cfg.nesterov,
                                   weight_decay=cfg.weight_decay, lr=lr)
        if cfg.b1 > 0:
            new_mom.append(m)
        updates.append(_to_param(xp, upd, p))
    new = dict(state, stats=stats, roots=roots, **counters)
    if cfg.graft.has_state:
        new["graft"] = new_graft
    if cfg.b1 > 0:
        new["momentum"] = new_mom
    return updates, new
