r"""Shampoo's per-step work over a whole tree: statistics and directions by block group, and the
elementwise tail (graft direction, grafting, momentum, decay) of the small leaves in one pass.

- Statistics ``F ← w₁F + w₂ G Gᵀ`` and directions (``R_L G R_R``, or the eigenbasis step) run
  on the stacks of :mod:`arrayopt.shampoo.batched` (one call per group of equal blocks).
- Grafting ``u = (‖u_g‖/‖d‖)·d`` takes the norms of a group's members at once where each member is
  a whole graft unit (a leaf of one block, or ``graft_per="block"``); a leaf of several blocks
  grafted per layer takes one norm over its blocks (:func:`arrayopt.grafting.graft`).
- The leaves of at most :data:`SMALL` entries are concatenated (per state dtype) and their graft
  direction and momentum/decay update run once on the flat array; larger leaves run on their own
  (a concatenation would cost them a copy).
"""

from __future__ import annotations

from array_api_compat import is_torch_array

from .. import grafting
from .._xp import is_low_precision
from ..momentum import heavy_ball_update
from . import batched
from .blocking import merge, split
from .math import corrected_moment

__all__ = ["SMALL", "statistics", "directions", "merged_directions", "tail"]

#: leaves with at most this many entries share one flat elementwise pass
SMALL = 1 << 16


def reshape(xp, x, shape):
    """``x`` in ``shape`` (``x`` itself when it has that shape: a reshape costs a call per leaf)."""
    return x if tuple(x.shape) == tuple(shape) else xp.reshape(x, shape)


def _ravel(xp, x):
    return x if len(x.shape) == 1 else xp.reshape(x, (-1,))


def _blocks(xp, g, plan):
    return split(xp, reshape(xp, g, plan.shape), plan.blocks)


def _gather(xp, group, g_blocks):
    """Per group: the stack of its members' gradient blocks."""
    return batched.stack(xp, [g_blocks[i][b] for i, b in group.members])


def _factor_stacks(xp, per_leaf_tree, group):
    """The stacked factors of a group (one ``(n, d, d)`` per preconditioned axis; read only: the last
    step's stack itself when the factors are still its members)."""
    k = len(per_leaf_tree[group.members[0][0]][group.members[0][1]])
    return [batched.stack_readonly(xp, [per_leaf_tree[i][b][j] for i, b in group.members]) for j in range(k)]


def _scatter(out, group, stacks):
    """Write a group's stacked factors back as per-leaf, per-block lists (views)."""
    parts = [batched.unstack(s) for s in stacks]
    for k, (i, b) in enumerate(group.members):
        out[i][b] = [p[k] for p in parts]


def restack(xp, tree_plan, per_leaf_tree):
    """``per_leaf_tree`` (per leaf, block, factor) with each group's factors as views of one new stack
    per factor axis (what :func:`_factor_stacks` then reads without a copy)."""
    out = [[list(blk) for blk in per_leaf] for per_leaf in per_leaf_tree]
    for group in tree_plan.groups:
        i0, b0 = group.members[0]
        stacks = [batched.stack(xp, [per_leaf_tree[i][b][j] for i, b in group.members])
                  for j in range(len(per_leaf_tree[i0][b0]))]
        _scatter(out, group, stacks)
    return out


def block_gradients(xp, plans, g32):
    """Per leaf, its gradient blocks (``None`` for a skipped leaf)."""
    return [None if plan.skipped else _blocks(xp, g, plan) for plan, g in zip(plans, g32)]


def statistics(xp, tree_plan, g_blocks, stats, b2):
    """New factor statistics (per leaf, block, factor), one batched update per group."""
    out = [[list(blk) for blk in per_leaf] for per_leaf in stats]
    for group in tree_plan.groups:
        g = _gather(xp, group, g_blocks)
        _scatter(out, group, batched.update_factors(xp, _factor_stacks(xp, stats, group), g, group.mask, b2))
    return out


def directions(xp, tree_plan, g_blocks, trees, *, corrected, moment_step, moment):
    """Per group, the stacked directions ``D`` (and, with eigenvalue correction, the new second
    moments as per-leaf lists). ``moment(gh, D, step) -> (X, D_new)`` on stacks."""
    out = []
    new_moments = None
    if corrected:
        new_moments = [list(m) for m in trees["second_moment"]]
    for group in tree_plan.groups:
        g = _gather(xp, group, g_blocks)
        if corrected:
            bases = _factor_stacks(xp, trees["bases"], group)
            dm = batched.stack(xp, [trees["second_moment"][i][b] for i, b in group.members])
            gh = batched.rotate(xp, g, bases, group.mask)
            x, dm_new = moment(gh, dm, moment_step) if moment is not None else \
                corrected_moment(xp, gh, dm, moment_step)
            out.append(batched.rotate(xp, x, bases, group.mask, back=True))
            for k, (i, b) in enumerate(group.members):
                new_moments[i][b] = dm_new[k, ...]
        else:
            out.append(batched.precondition(xp, g, _factor_stacks(xp, trees["roots"], group), group.mask))
    return out, new_moments


def _stacked_norms(xp, x):
    """``‖x_k‖₂`` of every member of stack ``x``, overflow-safe as :func:`arrayopt.grafting.norm`."""
    flat = xp.reshape(x, (x.shape[0], -1))
    amax = xp.max(xp.abs(flat), axis=1)
    scale = xp.where(amax > 0, amax, xp.ones_like(amax))
    y = flat / scale[:, None]
    return amax * xp.sqrt(xp.sum(y * y, axis=1))


def graft_groups(xp, tree_plan, plans, d_stacks, u_g, cfg):
    """Per leaf, the grafted preconditioned direction ``u`` in its plan's shape (``None`` for a
    skipped leaf): each group's members scaled at once where each is a whole graft unit, the
    others grafted per layer once merged."""
    per_member = cfg.graft.type != "none" and cfg.graft.per == "block"
    scaled, per_layer = [], set()
    for group, d in zip(tree_plan.groups, d_stacks):
        if cfg.graft.type != "none" and (per_member or all(len(plans[i].blocks) == 1 for i, _ in group.members)):
            a = batched.stack(xp, [_blocks(xp, u_g[i], plans[i])[b] for i, b in group.members])
            s = grafting.graft_scale(xp, _stacked_norms(xp, a), _stacked_norms(xp, d))
            d = d * xp.reshape(s, (s.shape[0],) + (1,) * (len(d.shape) - 1))
        elif cfg.graft.type != "none":  # several blocks grafted per layer
            per_layer.update(i for i, _ in group.members)
        scaled.append(d)
    merged = merged_directions(xp, tree_plan, plans, scaled, [plan.shape for plan in plans], cfg.block_size)
    return [grafting.graft(xp, u, reshape(xp, u_g[i], plans[i].shape)) if i in per_layer else u
            for i, u in enumerate(merged)]


def merged_directions(xp, tree_plan, plans, d_stacks, shapes, block_size: int):
    """Per leaf, its direction ``d`` (its groups' members merged back, in the leaf's ``shapes``, not
    grafted), ``None`` for a skipped leaf."""
    parts = [None if plan.skipped else [None] * len(plan.blocks) for plan in plans]
    for group, d in zip(tree_plan.groups, d_stacks):
        for (i, b), member in zip(group.members, batched.unstack(d)):
            parts[i][b] = member
    return [None if blocks is None else reshape(xp, merge(xp, blocks, plan.shape, block_size), shape)
            for plan, blocks, shape in zip(plans, parts, shapes)]


def _flat(xp, arrays):
    return xp.concat([_ravel(xp, a) for a in arrays]) if len(arrays) > 1 else _ravel(xp, arrays[0])


def _split(flat, shapes, sizes):
    if is_torch_array(flat):  # the views in one call
        return list(flat.split(sizes))
    out, o = [], 0
    for n in sizes:
        out.append(flat[o:o + n])
        o += n
    return out


def _runs(xp, leaves, dtypes):
    """Index lists: the small leaves by state dtype (one flat pass each), and each large leaf alone."""
    small: dict = {}
    runs = []
    for i, (p, dt) in enumerate(zip(leaves, dtypes)):
        n = 1
        for d in p.shape:
            n *= int(d)
        if n <= SMALL and len(p.shape) > 0:
            small.setdefault(str(dt), []).append(i)
        else:
            runs.append([i])
    return list(small.values()) + runs


def tail(xp, runs, leaves, arrays, fn, n_out: int = 2):
    """``fn(*flat inputs) -> tuple of flat outputs`` on each run of leaves (concatenated when a run
    has several); ``arrays``: per input, a per-leaf list (``None`` entries pass ``None``). Returns
    per output (``n_out`` of them) a per-leaf list, reshaped to the leaves' shapes."""
    outs = [[None] * len(leaves) for _ in range(n_out)]
    for run in runs:
        shapes = [tuple(leaves[i].shape) for i in run]
        sizes = [max(1, _size(s)) for s in shapes]
        ins = [None if arr is None or arr[run[0]] is None else _flat(xp, [arr[i] for i in run])
               for arr in arrays]
        res = fn(*ins)
        for j, r in enumerate(res):
            if r is None:
                continue
            parts = [reshape(xp, r, shapes[0])] if len(run) == 1 else \
                [reshape(xp, x, s) for x, s in zip(_split(r, shapes, sizes), shapes)]
            for i, x in zip(run, parts):
                outs[j][i] = x
    return outs


def _size(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


def runs_for(xp, leaves, dtypes, kind):
    """The runs of :func:`tail` (every leaf alone for a graft whose direction needs a per-leaf norm)."""
    if kind == "rmsprop_normalized":
        return [[i] for i in range(len(leaves))]
    return _runs(xp, leaves, dtypes)


def momentum_update(xp, cfg, lr):
    """``fn(u, m, p32) -> (Δ, m_new)`` of :func:`tail`: momentum and decoupled decay."""
    def fn(u, m, p32):
        return heavy_ball_update(xp, u, m, p32, b1=cfg.b1, ema=cfg.ema_momentum, nesterov=cfg.nesterov,
                                 weight_decay=cfg.weight_decay, lr=lr)
    return fn


def low_precision_params(xp, leaves, cfg):
    """Params in the state dtype where weight decay needs them (else ``None`` per leaf)."""
    if cfg.weight_decay == 0.0:
        return [None] * len(leaves)
    return [xp.astype(p, xp.float32) if is_low_precision(p.dtype) else p for p in leaves]
