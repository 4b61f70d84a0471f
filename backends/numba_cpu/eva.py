"""Eva's fused step on the Numba backend: two passes over each preconditioned weight.

Pass 1 (:func:`eva_reduce`, one read of ``G``): per output row ``r`` the mat-vec entry
``(Gā)_r`` and ``‖G_r‖²``, from which the driver forms ``β`` (or Eva-f's ``1/(γ + ‖ā‖²)``),
``⟨P, G⟩`` and, over all layers, the KL factor ``ν`` (``arrayopt.linalg.kl_scale``).
Pass 2 (``_eva_s.apply``, shared with Eva-s; one read of ``G``, read-write of the param and its
momentum buffer): the rank-one correction fused into the write of ``P``, then the SGD-momentum
step of ``arrayopt.first_order.SGD``, in the reference's order of operations:
``d = (G - c_r ā_c)·(ν/γ) (+ λθ)``, ``b = μb + d``, ``θ -= η(d + μb`` if Nesterov else ``b)``.
Leaves without statistics take the fused SGD kernel. The first pass is also the finiteness
check of the preconditioned gradients, so a step reads each of them twice, not three times.
Scalars arrive typed as the leaf. Eva-s has its own passes: ``_eva_s.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import OPTS, SERIAL, SMALL, renamed
from ._eva_s import APPLY, run_eva_s
from .first_order import sgd_leaves

__all__ = ["OPS", "run"]

#: Eva and Eva-f in the ``"out_in"`` layout; Eva-s (``_eva_s.py``) reads every tensor in its own
#: axis order (its step has no layout: ``None``)
OPS = {"eva": {"variant": frozenset({"eva", "eva_f", "eva_s"}), "weight_layout": frozenset({"out_in", None})}}


def eva_reduce(G, a, rowdot, rowsq):
    for r in prange(G.shape[0]):
        s = G[r, 0] * 0
        q = G[r, 0] * 0
        for c in range(G.shape[1]):
            x = G[r, c]
            s += x * a[c]
            q += x * x
        rowdot[r] = s
        rowsq[r] = q


# reassociation only (no nnan/ninf: NaN and Inf still propagate): the row sums vectorise,
# rounding differs from the reference's sums within the parity tolerance
_REDUCE = {True: njit(**dict(OPTS, fastmath={"reassoc"}))(renamed(eva_reduce, "_parallel")),
           False: njit(**dict(SERIAL, fastmath={"reassoc"}))(renamed(eva_reduce, "_serial"))}


def _as2d(v, rows):
    return v.reshape(rows, -1)


def run(backend, op, params, grads, states, step, g_views=None):
    """Eva's step in place. ``states = [bufs, layers]``: ``layers`` holds ``(i, b, ā, ḡ)`` per
    preconditioned weight (``b`` the bias leaf or ``None``; ``ā`` with the bias entry when ``b``
    is set; ``ḡ`` ``None`` for Eva-f), the running vectors already refreshed; ``bufs``: the
    momentum buffers or ``None``.

    The first pass doubles as the finiteness check of those layers' gradients (``‖G_r‖²`` is
    finite only if the row is): returns ``False``, having written nothing, when one is not.
    The caller checks the other leaves."""
    from arrayopt.eva.math import kl_scale

    if step.variant == "eva_s":
        return run_eva_s(backend, params, grads, states, step, g_views)
    bufs, layers = states
    p_views = backend.views(params)
    g_views = g_views if g_views is not None else backend.views(grads)
    b_views = backend.views(bufs) if bufs else None
    dt = p_views[0].dtype.type
    damping = dt(step.damping)
    done = set()
    plans, inners, p_sq, g_sq = [], [], [], []
    finite = True
    for i, b, a, g in layers:
        a = backend.views([a])[0]
        d_out = int(params[i].shape[0])
        G = _as2d(g_views[i], d_out)
        n_in = G.shape[1]
        rowdot = np.empty(d_out, G.dtype)
        rowsq = np.empty(d_out, G.dtype)
        _REDUCE[G.size >= SMALL](G, a[:n_in], rowdot, rowsq)  # small layers: one thread
        if b is not None:
            gb = g_views[b]
            rowdot = rowdot + gb * a[n_in]
            rowsq = rowsq + gb * gb
        gsq = np.sum(rowsq)
        if not np.isfinite(gsq):  # NaN/Inf in G, or squares past the dtype's range: the exact check
            finite = finite and backend.all_finite([g_views[i]] + ([g_views[b]] if b is not None else []))
        if g is not None:  # Eva: β = ḡᵀGā/(γ + ‖ā‖²‖ḡ‖²), c_r = β ḡ_r
            g = backend.views([g])[0]
            gGa = np.sum(g * rowdot)
            beta = gGa / (damping + np.sum(a * a) * np.sum(g * g))
            coef = beta * g
            inner = (gsq - beta * gGa) / damping
        else:  # Eva-f: c_r = (Gā)_r/(γ + ‖ā‖²)
            c = dt(1.0) / (damping + np.sum(a * a))
            coef = c * rowdot
            inner = (gsq - c * np.sum(rowdot * rowdot)) / damping
        plans.append((i, b, a, coef, G, n_in))
        inners.append(np.asarray(inner))
        if step.kl_mode == "rescale":  # ‖P‖² = ‖G - c āᵀ‖²/γ², by rows
            P2 = (G - coef[:, None] * a[None, :n_in]) / damping
            ps = np.sum(P2 * P2)
            if b is not None:
                pb = (g_views[b] - coef * a[n_in]) / damping
                ps = ps + np.sum(pb * pb)
            p_sq.append(np.asarray(ps))
            g_sq.append(np.asarray(gsq))
    if not finite:
        return False
    use_nu = step.kl_mode != "none" and bool(plans)
    nu = dt(kl_scale(inners, step.lr, step.kl_clip, step.kl_mode, p_sq=p_sq or None, g_sq=g_sq or None)) \
        if use_nu else dt(1.0)
    scale = nu / damping  # ν/γ once: one multiply per entry (the reference divides; rounding-level)
    lr, mu, wd = dt(step.lr), dt(step.momentum), dt(step.weight_decay)
    dummy = np.empty((1, 1), p_views[0].dtype)
    for i, b, a, coef, G, n_in in plans:
        rows = G.shape[0]
        for leaf, col in ((i, slice(0, n_in)), (b, slice(n_in, n_in + 1))):
            if leaf is None:
                continue
            buf = _as2d(b_views[leaf], rows) if b_views is not None else dummy
            # the row coefficients c_r and the columns ā: Eva-s's pass 4, d = (G - c āᵀ)·ν/γ
            APPLY[G.size >= SMALL](_as2d(p_views[leaf], rows), _as2d(g_views[leaf], rows), buf,
                                   coef.astype(G.dtype, copy=False), np.ascontiguousarray(a[col]), scale, lr, mu,
                                   wd, step.nesterov, b_views is not None)
            done.add(leaf)
    sgd_leaves(backend, params, grads, bufs, done, (step.lr, step.momentum, step.weight_decay, step.nesterov))
