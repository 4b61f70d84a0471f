r"""Sketchy's fused step on the Numba backend: everything after the low-rank apply (root-inverse
Shampoo runs the same op after its directions ``d = R_L G R_R``).

The direction ``D = L̃^{-1/4} G R̃^{-1/4}`` (or its order-k analogue) is two skinny
products per axis through the namespace (BLAS); then per leaf, with the reference's
order of operations (:func:`arrayopt.sketchy.optimizer.leaf_update`):

- pass 1 (:func:`sketchy_norms`, preconditioned leaves with a graft): the graft
  accumulator ``A`` is updated in place and ``Σa²``, ``Σd²`` are accumulated in float64
  (the graft direction ``a`` is never stored; the sums in SIMD lanes, so their order, and their
  float64 rounding, depend on the vector width and thread count);
- pass 2 (:func:`sketchy_write`): ``u = (‖a‖/‖D‖)·D`` (or ``u = a`` for a leaf that takes the
  graft step only, its accumulator updated in this same pass), heavy-ball momentum,
  decoupled weight decay and the parameter write, in place.

Graft kinds (``KIND``): ``sgd`` ``a = g``; ``adagrad`` ``A ← A + g²``; ``rmsprop``
``A ← β₂A + (1-β₂)g²``; ``adam`` the same ``A`` and ``a = g/(√A/√bc₂ + ε)``; the others
``a = g/(√A + ε)``. Float64 squares of float32 entries never round to 0 or inf, so the
norms are overflow- and underflow-safe for float32 (see :mod:`arrayopt.grafting`); a
float64 leaf whose float64 sum is 0 or not finite takes the reference's scaled norm.
Scalars arrive typed as the leaf.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import OPTS, REDUCE, SERIAL, SMALL, renamed
from ._ptrs import NUMPY_DTYPE, address_table, vector

__all__ = ["KIND", "OPS", "run"]

#: rmsprop_normalized needs ‖g‖ before its accumulator, sqrt_n is rare: the reference runs them
OPS = {"sketchy": {"graft": frozenset({"none", "sgd", "adagrad", "rmsprop", "adam"})}}

#: graft kind -> the kernels' integer code
KIND = {"sgd": 0, "adagrad": 1, "rmsprop": 2, "adam": 3}


@njit(**SERIAL)
def graft_at(gi, acc_i, kind, b2, omb2, eps, bc2s):
    """``(a, A_new)`` of one entry, in the reference's order of operations (strict IEEE: its
    instructions keep these flags where LLVM inlines it into :func:`sketchy_norms`)."""
    if kind == 0:
        return gi, acc_i
    if kind == 1:
        ai = acc_i + gi * gi
    else:
        ai = acc_i * b2 + (gi * gi) * omb2
    if kind == 3:
        return gi / (np.sqrt(ai) / bc2s + eps), ai
    return gi / (np.sqrt(ai) + eps), ai


def sketchy_norms(g, acc, d, kind, b2, omb2, eps, bc2s):
    sa = 0.0
    sd = 0.0
    for i in prange(g.size):
        a, ai = graft_at(g[i], acc[i], kind, b2, omb2, eps, bc2s)
        if kind != 0:
            acc[i] = ai
        a64 = np.float64(a)
        d64 = np.float64(d[i])
        sa += a64 * a64
        sd += d64 * d64
    return sa, sd


def sketchy_write(p, g, acc, d, m, kind, precond, scale, b2, omb2, eps, bc2s, b1, w1, nesterov, use_m, wd, lr):
    for i in prange(p.size):
        if precond:
            u = d[i] * scale
        else:
            u, ai = graft_at(g[i], acc[i], kind, b2, omb2, eps, bc2s)
            if kind != 0:
                acc[i] = ai
        if w1 != 1:
            u = u * w1
        if use_m:
            mi = m[i] * b1 + u
            m[i] = mi
            if nesterov:
                v = u + mi * b1
            else:
                v = mi
        else:
            v = u
        if wd != 0:
            v = v + p[i] * wd
        p[i] = p[i] + v * (-lr)


#: ``REDUCE`` flags: the float64 sums reassociate into SIMD lanes (6.5x faster with the Adam graft,
#: 2M float32 entries, 2 threads); the graft arithmetic keeps :func:`graft_at`'s strict flags
_NORMS = {True: njit(**dict(REDUCE, parallel=True))(renamed(sketchy_norms, "_parallel")),
          False: njit(**REDUCE)(renamed(sketchy_norms, "_serial"))}
_WRITE = {True: njit(**OPTS)(renamed(sketchy_write, "_parallel")),
          False: njit(**SERIAL)(renamed(sketchy_write, "_serial"))}


# ---------------------------------------------------------------- small torch leaves, one call per dtype
# ``addrs[j] = (p, g, acc, d, m)`` of leaf ``j`` (a 1-element dummy where the config keeps no accumulator
# or momentum, or the leaf has no direction: the kernels never read those); each leaf runs the serial
# kernels above, unchanged, so a leaf steps bit for bit as it would alone.

_norms_1 = _NORMS[False]
_write_1 = _WRITE[False]


@njit(**SERIAL)
def norms_addrs(addrs, sizes, has_d, kind, b2, omb2, eps, bc2s, out):
    """``out[j] = (Σa², Σd²)`` of every leaf ``j`` with a direction (pass 1, accumulators updated)."""
    for j in range(sizes.size):
        if has_d[j]:
            n = sizes[j]
            acc = vector(addrs[j, 2], n if kind != 0 else 1, eps)
            sa, sd = _norms_1(vector(addrs[j, 1], n, eps), acc, vector(addrs[j, 3], n, eps), kind, b2, omb2, eps,
                              bc2s)
            out[j, 0] = sa
            out[j, 1] = sd


@njit(**SERIAL)
def write_addrs(addrs, sizes, has_d, scales, kind, b2, omb2, eps, bc2s, b1, w1, nesterov, use_m, wd, lr):
    """Pass 2 of every leaf of the table (``scales[j]``: its graft scale; 0 without a direction)."""
    for j in range(sizes.size):
        n = sizes[j]
        pre = has_d[j]
        _write_1(vector(addrs[j, 0], n, eps), vector(addrs[j, 1], n, eps),
                 vector(addrs[j, 2], n if kind != 0 and not pre else 1, eps), vector(addrs[j, 3], n if pre else 1, eps),
                 vector(addrs[j, 4], n if use_m else 1, eps), kind, pre, scales[j], b2, omb2, eps, bc2s, b1, w1,
                 nesterov, use_m, wd, lr)


def _small_torch_leaves(params, directions) -> tuple:
    """``({torch dtype: leaf indices}, other indices)``: the torch leaves under ``SMALL`` entries whose
    direction (if any) is contiguous and of their dtype go to one call per dtype."""
    by_dtype: dict = {}
    large = []
    for i, p in enumerate(params):
        d = directions[i]
        if p.numel() < SMALL and (d is None or (d.dtype == p.dtype and d.is_contiguous())):
            by_dtype.setdefault(p.dtype, []).append(i)
        else:
            large.append(i)
    return by_dtype, large


def _run_small(step, kind, idx, params, grads, accs, moms, directions):
    """:func:`run`'s two passes on the small torch leaves ``idx`` of one dtype, by address."""
    dt = NUMPY_DTYPE[str(params[idx[0]].dtype)]
    cast = dt.type
    dummy = np.zeros(1, dt)
    da = dummy.ctypes.data
    has_d = np.array([directions[i] is not None for i in idx], dtype=np.bool_)
    addrs, sizes = address_table([
        (params[i].numel(), params[i].data_ptr(), grads[i].data_ptr(), accs[i].data_ptr() if accs else da,
         directions[i].data_ptr() if directions[i] is not None else da, moms[i].data_ptr() if moms else da)
        for i in idx])
    sc = (cast(step.graft_b2), cast(1.0 - step.graft_b2), cast(step.graft_eps), cast(step.graft_bc2 ** 0.5))
    if step.graft == "none":
        scales = has_d.astype(dt)
    else:
        sums = np.zeros((len(idx), 2))
        norms_addrs(addrs, sizes, has_d, kind, *sc, sums)
        na, nd = np.sqrt(sums[:, 0]), np.sqrt(sums[:, 1])
        if dt == np.float64:  # extreme float64 magnitudes: the reference's scaled norms
            for j in np.flatnonzero(has_d & ~((sums > 0.0) & (sums < np.inf)).all(axis=1)):
                i = idx[j]
                na[j], nd[j] = _exact_norms(step, grads[i].detach().numpy().reshape(-1),
                                            accs[i].detach().numpy().reshape(-1) if accs else None,
                                            directions[i].detach().numpy().reshape(-1), cast)
        # the zero guard: u = 0 when ‖D‖ = 0 (and for a leaf without a direction)
        scales = np.divide(na, nd, out=np.zeros_like(na), where=has_d & (nd > 0)).astype(dt)
    w1 = cast(1.0 - step.b1) if step.ema else cast(1.0)
    write_addrs(addrs, sizes, has_d, scales, kind, *sc, cast(step.b1), w1, step.nesterov, moms is not None,
                cast(step.weight_decay), cast(step.lr))


def _exact_norms(step, g, acc_new, d, cast):
    """The reference's scaled norms ``(‖a‖, ‖D‖)``, ``a`` from the updated accumulator."""
    from arrayopt import grafting

    if step.graft == "sgd":
        a = g
    elif step.graft == "adam":
        a = g / (np.sqrt(acc_new) / cast(step.graft_bc2 ** 0.5) + cast(step.graft_eps))
    else:
        a = g / (np.sqrt(acc_new) + cast(step.graft_eps))
    return float(grafting.norm(np, a)), float(grafting.norm(np, d))


def run(backend, op, params, grads, states, step, g_views=None):
    """Sketchy's step in place. ``states = [accs, moms, directions]``: ``directions[i]`` the leaf's
    ``D`` (any layout, the leaf's shape) or ``None`` for a leaf that takes the graft step only;
    ``accs``/``moms`` the graft accumulators and momentum buffers, or ``None`` when the config
    keeps none."""
    accs, moms, directions = states
    graft = step.graft
    kind = KIND["sgd" if graft == "none" else graft]
    leaves = range(len(params))
    if params and hasattr(params[0], "data_ptr"):  # torch: the small leaves by address
        by_dtype, leaves = _small_torch_leaves(params, directions)
        for idx in by_dtype.values():
            _run_small(step, kind, idx, params, grads, accs, moms, directions)
        if not leaves:
            return None
    p_views = backend.views(params)
    g_views = g_views if g_views is not None else backend.views(grads)
    a_views = backend.views(accs) if accs else None
    m_views = backend.views(moms) if moms else None
    ema = step.ema
    for i in leaves:
        p, g = p_views[i], g_views[i]
        cast = p.dtype.type
        dummy = np.empty(1, p.dtype)
        acc = a_views[i] if a_views is not None else dummy
        m = m_views[i] if m_views is not None else dummy
        big = p.size >= SMALL
        sc = (cast(step.graft_b2), cast(1.0 - step.graft_b2), cast(step.graft_eps), cast(step.graft_bc2 ** 0.5))
        d = directions[i]
        if d is not None:
            d = np.ascontiguousarray(backend.views([d])[0])
            if graft == "none":
                scale = cast(1.0)
            else:
                sa, sd = _NORMS[big](g, acc, d, kind, *sc)
                na, nd = np.sqrt(sa), np.sqrt(sd)
                if p.dtype == np.float64 and not (0.0 < sa < np.inf and 0.0 < sd < np.inf):
                    na, nd = _exact_norms(step, g, acc, d, cast)  # extreme float64 magnitudes
                # the zero guard: u = 0 when ‖D‖ = 0
                scale = cast(na / nd) if nd > 0 else cast(0.0)
        else:
            d, scale = dummy, cast(0.0)
        w1 = cast(1.0 - step.b1) if ema else cast(1.0)
        _WRITE[big](p, g, acc, d, m, kind, directions[i] is not None, scale, *sc, cast(step.b1), w1,
                    step.nesterov, m_views is not None, cast(step.weight_decay), cast(step.lr))
