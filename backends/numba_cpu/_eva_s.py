r"""Eva-s's fused step on the Numba backend (called by ``eva.py`` for ``variant="eva_s"``).

Each preconditioned leaf ``G`` of order ``k ≥ 2`` is read as a matrix ``(R, C)``: its first
axis by the product of the others. With ``u = s₂ ⊗ … ⊗ s_k`` (length ``C``) the step (E4)
with SGD-norm grafting and the SGD-momentum step is

.. math::

    s_i ← ξ s_i + w·\mathrm{mean}_{axes ≠ i}(G),\quad
    c = Σ_{r,c} G_{rc}\,s_{1,r} u_c,\quad
    P = G - \frac{c}{γ + Π_i‖s_i‖²}\, s_1 u^T,\quad
    d = P·‖G‖/‖P‖,

then ``b = μb + (d + λθ)``, ``θ -= η(…)`` (:mod:`arrayopt.first_order`). Three or four passes
over ``G``, each a Numba kernel over chunks of rows:

1. (refresh steps) the row sums (``s₁``), the column sums (the other axes' sums come from
   them: ``C`` entries, not ``R·C``) and ``‖G‖²``, four rows at a time;
2. the contraction ``c`` with the rows of ``G u`` (and ``‖G‖²`` when 1 did not run);
3. ``‖P‖²``, only where ``‖G‖² - 2 o₁ᵀ(G u) + ‖o₁‖²‖u‖²`` (``o₁ = c s₁/(γ + Π‖s_i‖²)``) cancels
   below ``‖G‖²/16``;
4. the write of ``θ`` and the momentum buffer.

Passes 1–2 of every leaf run before anything is written: their ``‖G‖²`` (float64) is the
finiteness and range check of the leaf (``‖G‖² < 2⁻⁴⁸·max``, as ``gradients_in_range``), so
a non-finite or out-of-range gradient returns ``False`` with nothing written. Sums accumulate
in float64 per chunk of rows, the chunks fixed by the shape and added in order: the result
does not depend on the number of threads. Rounding differs from the reference's (float32:
within 1e-5 normwise; float64: within 1e-12).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..._overflow import IN_RANGE
from ._common import OPTS, SERIAL, SMALL, renamed

__all__ = ["run_eva_s", "APPLY"]

_FLAGS = {True: dict(OPTS, fastmath={"reassoc", "nsz"}), False: dict(SERIAL, fastmath={"reassoc", "nsz"})}
_PARTIAL_MAX = 1 << 22  # float64 entries of the per-chunk column sums


def _chunks(rows: int, cols: int) -> int:
    """Chunks of rows of a pass: at most 16 (the threads of a 16-core host), and at most
    ``_PARTIAL_MAX`` partial column sums. Pass 1 writes ``chunks × C`` partial column sums and
    NumPy adds them: at 64 chunks that was 16 MB a step on ResNet-18, and the step 1.2x slower."""
    return max(1, min(rows, 16, _PARTIAL_MAX // max(cols, 1)))


def sums(G, rowsum, colpart, sqpart):
    """Pass 1: ``rowsum[r] = Σ_c G[r, c]``, ``colpart[h, c]`` the column sums of chunk ``h``,
    ``sqpart[h]`` its ``Σ G²`` (all float64). Four rows at a time: one update of the column sums
    per four entries."""
    R, C = G.shape
    nch = colpart.shape[0]
    for h in prange(nch):
        lo = h * R // nch
        hi = (h + 1) * R // nch
        q = 0.0
        for c in range(C):
            colpart[h, c] = 0.0
        r = lo
        while r + 4 <= hi:
            t0 = 0.0
            t1 = 0.0
            t2 = 0.0
            t3 = 0.0
            for c in range(C):
                x0 = float(G[r, c])
                x1 = float(G[r + 1, c])
                x2 = float(G[r + 2, c])
                x3 = float(G[r + 3, c])
                t0 += x0
                t1 += x1
                t2 += x2
                t3 += x3
                q += (x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3)
                colpart[h, c] += (x0 + x1) + (x2 + x3)
            rowsum[r] = t0
            rowsum[r + 1] = t1
            rowsum[r + 2] = t2
            rowsum[r + 3] = t3
            r += 4
        while r < hi:
            t = 0.0
            for c in range(C):
                x = float(G[r, c])
                t += x
                q += x * x
                colpart[h, c] += x
            rowsum[r] = t
            r += 1
        sqpart[h] = q


def contract(G, s1, u, rowdot, cpart, sqpart):
    """Pass 2: ``rowdot[r] = Σ_c G[r, c]·u[c]``, ``cpart[h] = Σ_{r ∈ h} s1[r]·rowdot[r]`` and
    ``sqpart[h] = Σ_{r ∈ h} Σ_c G²`` (float64). Four rows at a time (independent sums)."""
    R, C = G.shape
    nch = cpart.shape[0]
    for h in prange(nch):
        lo = h * R // nch
        hi = (h + 1) * R // nch
        acc = 0.0
        q = 0.0
        r = lo
        while r + 4 <= hi:
            t0 = 0.0
            t1 = 0.0
            t2 = 0.0
            t3 = 0.0
            for c in range(C):
                x0 = float(G[r, c])
                x1 = float(G[r + 1, c])
                x2 = float(G[r + 2, c])
                x3 = float(G[r + 3, c])
                uc = u[c]
                t0 += x0 * uc
                t1 += x1 * uc
                t2 += x2 * uc
                t3 += x3 * uc
                q += (x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3)
            rowdot[r] = t0
            rowdot[r + 1] = t1
            rowdot[r + 2] = t2
            rowdot[r + 3] = t3
            acc += ((s1[r] * t0 + s1[r + 1] * t1) + (s1[r + 2] * t2 + s1[r + 3] * t3))
            r += 4
        while r < hi:
            t = 0.0
            for c in range(C):
                x = float(G[r, c])
                t += x * u[c]
                q += x * x
            rowdot[r] = t
            acc += s1[r] * t
            r += 1
        cpart[h] = acc
        sqpart[h] = q


def p_sumsq(G, o1, u, part):
    """Pass 3: ``part[h] = Σ_{r ∈ h} Σ_c (G[r, c] - o1[r]·u[c])²`` (the difference in ``G``'s dtype,
    the square and sum in float64)."""
    R, C = G.shape
    nch = part.shape[0]
    for h in prange(nch):
        lo = h * R // nch
        hi = (h + 1) * R // nch
        q = 0.0
        for r in range(lo, hi):
            o = o1[r]
            for c in range(C):
                x = float(G[r, c] - o * u[c])
                q += x * x
        part[h] = q


def apply(p, G, buf, o1, u, scale, lr, mu, wd, nesterov, use_buf):
    """Pass 4: ``d = (G - o1 uᵀ)·scale``, then the SGD-momentum step of ``arrayopt.first_order``."""
    R, C = G.shape
    for r in prange(R):
        o = o1[r]
        for c in range(C):
            d = (G[r, c] - o * u[c]) * scale
            if wd != 0:
                d = d + wd * p[r, c]
            if use_buf:
                b = buf[r, c] * mu + d
                buf[r, c] = b
                if nesterov:
                    p[r, c] = p[r, c] - lr * (d + mu * b)
                else:
                    p[r, c] = p[r, c] - lr * b
            else:
                p[r, c] = p[r, c] - lr * d


_SUMS = {par: njit(**_FLAGS[par])(renamed(sums, "_parallel" if par else "_serial")) for par in (True, False)}
_CONTRACT = {par: njit(**_FLAGS[par])(renamed(contract, "_parallel" if par else "_serial")) for par in (True, False)}
_P_SUMSQ = {par: njit(**_FLAGS[par])(renamed(p_sumsq, "_parallel" if par else "_serial")) for par in (True, False)}
#: pass 4, also Eva and Eva-f's write (``eva.py``: the row coefficients and ``ā``)
APPLY = {True: njit(**OPTS)(renamed(apply, "_parallel")), False: njit(**SERIAL)(renamed(apply, "_serial"))}


def _kron_tail(vectors, dtype):
    """``s₂ ⊗ … ⊗ s_k`` flattened in C order, multiplied left to right in ``dtype``."""
    u = vectors[0].astype(dtype, copy=False)
    for v in vectors[1:]:
        u = (u[:, None] * v[None, :]).reshape(-1)
    return np.ascontiguousarray(u)


def _first_passes(G, s, refresh, decay, w):
    """Passes 1–2 of one leaf: ``(new vectors, c, ‖G‖², G u)`` (float64); writes nothing."""
    R, C = G.shape
    par = G.size >= SMALL
    nch = _chunks(R, C)
    dt = G.dtype.type
    shape = tuple(int(v.shape[0]) for v in s)
    if refresh:
        rowsum = np.empty(R)
        colpart = np.empty((nch, C))
        sqpart = np.empty(nch)
        _SUMS[par](G, rowsum, colpart, sqpart)
        n = G.size
        col = colpart.sum(axis=0).reshape(shape[1:])
        total = [rowsum] + [col.sum(axis=tuple(a for a in range(len(shape) - 1) if a != i))
                            for i in range(len(shape) - 1)]
        means = [(t / (n // d)).astype(dt) for t, d in zip(total, shape)]
        s = [v * dt(decay) + m * dt(w) for v, m in zip(s, means)]
        sq = float(sqpart.sum())
    u = _kron_tail(s[1:], np.float64)
    cpart = np.empty(nch)
    sqpart2 = np.empty(nch)
    rowdot = np.empty(R)
    _CONTRACT[par](G, s[0].astype(np.float64), u, rowdot, cpart, sqpart2)
    if not refresh:
        sq = float(sqpart2.sum())
    return s, float(cpart.sum()), sq, rowdot


def _p_sumsq(G, o1, u, sq, rowdot):
    """``‖P‖²`` of ``P = G - o1 uᵀ``: ``‖G‖² - 2 o1ᵀ(G u) + ‖o1‖²‖u‖²`` (float64) when that is at
    least ``‖G‖²/16`` (its rounding, a few float64 ulps of ``‖G‖²``, then moves ``‖P‖`` by under
    1e-14 relative; float32's ``u`` against the float64 one of ``G u``: under 4e-6), else the
    exact pass 3."""
    # sums, not BLAS dot products: OpenBLAS threads spin after a call and slow the next kernel
    o = o1.astype(np.float64)
    uu = u.astype(np.float64)
    analytic = sq - 2.0 * float(np.sum(o * rowdot)) + float(np.sum(o * o)) * float(np.sum(uu * uu))
    if analytic >= sq / 16:
        return analytic
    R, C = G.shape
    part = np.empty(_chunks(R, C))
    _P_SUMSQ[G.size >= SMALL](G, o1, u, part)
    return float(part.sum())


def run_eva_s(backend, params, grads, states, step, g_views):
    """Eva-s's step in place. ``states = [bufs, (refreshed, kv_s)]``: the momentum buffers (or
    ``None``), the indices of the leaves whose vectors are refreshed this step and the vectors
    of every leaf (``kv_s[i]``: one vector per axis, updated in place). Leaves of fewer than 2
    axes take the fused SGD kernel. Returns ``False``, having written nothing, when a
    preconditioned gradient is not finite or too large for the in-place step."""
    from .first_order import sgd_leaves

    bufs, (refreshed, kv_s) = states
    p_views = backend.views(params)
    g_views = g_views if g_views is not None else backend.views(grads)
    b_views = backend.views(bufs) if bufs else None
    damping, decay = step.damping, step.stat_decay
    w = 1.0 if decay == 1.0 else 1.0 - decay
    refreshed = set(refreshed)
    plans = []
    for i, p in enumerate(params):
        if len(p.shape) < 2:
            continue
        rows = int(p.shape[0])
        G = g_views[i].reshape(rows, -1)
        dt = G.dtype.type
        s_old = [backend.views([v])[0] for v in kv_s[i]]
        s, c, sq, rowdot = _first_passes(G, s_old, i in refreshed, decay, w)
        if not sq < float(np.finfo(G.dtype).max) * IN_RANGE:
            return False  # NaN/Inf, or squares near the dtype's range: the reference step decides
        plans.append((i, G, s_old, s, dt(c), sq, rowdot))
    lr, mu, wd = step.lr, step.momentum, step.weight_decay
    done = set()
    for i, G, s_old, s, c, sq, rowdot in plans:
        dt = G.dtype.type
        if i in refreshed:
            for old, new in zip(s_old, s):
                old[...] = new
        norms = _norms(s, dt)
        coef = c / (dt(damping) + norms)
        o1 = np.ascontiguousarray(coef * s[0])
        u = _kron_tail(s[1:], G.dtype)
        R, C = G.shape
        par = G.size >= SMALL
        gn, pn = dt(math.sqrt(sq)), dt(math.sqrt(max(_p_sumsq(G, o1, u, sq, rowdot), 0.0)))
        scale = gn / pn if pn > 0 else dt(0)
        buf = b_views[i].reshape(R, C) if b_views is not None else np.empty((1, 1), G.dtype)
        APPLY[par](p_views[i].reshape(R, C), G, buf, o1, u, scale, dt(lr), dt(mu), dt(wd), step.nesterov,
                    b_views is not None)
        done.add(i)
    sgd_leaves(backend, params, grads, bufs, done, (lr, mu, wd, step.nesterov))
    return True


def _norms(s, dt):
    """``Π_i ‖s_i‖²`` in ``dt``, as the reference forms it (each ``Σ s_i²`` in the vectors' dtype)."""
    out = None
    for v in s:
        q = np.sum(v * v)
        out = q if out is None else out * q
    return dt(out)
