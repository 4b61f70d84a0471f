"""Fused Numba kernels for SONew (``arrayopt.sonew``), in place on flat views.

Same arithmetic, in the same order, as the reference ``SONew.flat_leaf`` and
``arrayopt.linalg.sonew``; scalars arrive typed in the param dtype, so no
float64 constant promotes float32 math (norm accumulators are float64, which
only makes them more accurate). No ``fastmath``.

Tridiagonal (``b = 1``), three passes over chunks of the vector (each chunk in
one thread, sequential inside, so neighbours' values travel in registers; the
old statistics at chunk boundaries are saved before the parallel pass):

1. ``tri_stats``: ``m``, ``band`` updated in place; the band ∞-norm of ``Ĥ``
   (relative eps) and the graft's target norm;
2. ``tri_precond``: factor (edge removal) and ``u = X m̂`` in one sweep; with no
   graft it writes the params directly, otherwise ``u`` to a scratch vector and
   ``‖u‖``;
3. ``scaled_apply``: ``p ← p - lr (c u + λ p)``.

Any band ``b`` (``band_*``): statistics, ∞-norm, then one batched kernel that
factors every row's ``b×b`` window (unpivoted ``LDLᵀ`` with the per-row
bandwidth fallback) and applies ``Lᵀ`` and ``D``, then ``L`` and the update.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(parallel=True, cache=True, nogil=True, boundscheck=False)
_SERIAL = dict(cache=True, nogil=True, boundscheck=False)

GRAFT_CODES = {"none": 0, "adam": 1, "sgd": 2, "momentum": 3}
CHUNK = 16384


@njit(**_SERIAL)
def _save_boundaries(band, nchunks, chunk, saved):
    for c in range(1, nchunks):
        saved[c] = band[c * chunk - 1, 1]


@njit(**_OPTS)
def tri_stats(g, m, band, saved, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk):
    """Pass 1 (b = 1): moments in place; per-chunk max row sum of |Ĥ| and graft norm²."""
    n = g.size
    nchunks = rows_out.size
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        # new off-diagonal of row lo-1 (its old value saved before this pass)
        if lo > 0:
            e_prev = (saved[c] * b2 + omb2 * (g[lo - 1] * g[lo])) / bc2
        else:
            e_prev = omb2 * 0  # typed zero
        rmax = e_prev * 0
        acc = 0.0
        for j in range(lo, hi):
            gj = g[j]
            mj = m[j] + omb1 * (gj - m[j])
            m[j] = mj
            dj = band[j, 0] * b2 + omb2 * (gj * gj)
            band[j, 0] = dj
            if j + 1 < n:
                ej = band[j, 1] * b2 + omb2 * (gj * g[j + 1])
            else:
                ej = band[j, 1] * b2
            band[j, 1] = ej
            dh = dj / bc2
            eh = ej / bc2
            r = dh + abs(eh) + abs(e_prev)
            if r > rmax:
                rmax = r
            e_prev = eh
            if graft == 1:
                a = (mj / bc1) / (np.sqrt(dh) + graft_eps)
                acc += float(a) * float(a)
            elif graft == 2:
                acc += float(gj) * float(gj)
            elif graft == 3:
                mh = mj / bc1
                acc += float(mh) * float(mh)
        rows_out[c] = rmax
        norms_out[c] = acc


@njit(**_OPTS)
def tri_precond(p, m, band, u, bc1, bc2, eps_eff, tau, neg_lr, wd, write_p, norms_out, removed_out, chunk):
    """Pass 2 (b = 1): ψ, s (edge removal), ``y = L D Lᵀ m̂``; writes p (no graft) or u."""
    n = m.size
    nchunks = norms_out.size
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = 0.0
        removed = 0
        # t_{lo-1} and ψ_{lo-1}, recomputed (read-only pass: no race)
        t_prev = eps_eff * 0
        psi_prev = eps_eff * 0
        if lo > 0:
            i = lo - 1
            d0 = band[i, 0] / bc2 + eps_eff
            z = band[i, 1] / bc2
            dn = band[i + 1, 0] / bc2 + eps_eff
            w = z / dn
            s = d0 - z * w
            if not (s > tau * d0):
                w = w * 0
                s = d0
            psi_prev = w
            t_prev = (m[i] / bc1 - w * (m[i + 1] / bc1)) / s
        # sliding values: H_jj (with eps) of the current row
        d0 = band[lo, 0] / bc2 + eps_eff
        for j in range(lo, hi):
            mh = m[j] / bc1
            if j + 1 < n:
                z = band[j, 1] / bc2
                dn = band[j + 1, 0] / bc2 + eps_eff
                w = z / dn
                s = d0 - z * w
                if not (s > tau * d0):
                    w = w * 0
                    s = d0
                    removed += 1
                t = (mh - w * (m[j + 1] / bc1)) / s
            else:
                dn = d0
                w = d0 * 0
                t = mh / d0
            y = t - psi_prev * t_prev
            if write_p:
                pj = p[j]
                if wd != 0:
                    upd = neg_lr * (y + wd * pj)
                else:
                    upd = neg_lr * y
                p[j] = pj + upd
            else:
                u[j] = y
                acc += float(y) * float(y)
            t_prev = t
            psi_prev = w
            d0 = dn
        norms_out[c] = acc
        removed_out[c] = removed


@njit(**_OPTS)
def scaled_apply(p, u, scale, neg_lr, wd):
    """``p ← p + (-lr) (scale·u + λ p)`` (the grafted update)."""
    for j in prange(p.size):
        pj = p[j]
        d = u[j] * scale
        if wd != 0:
            d = d + wd * pj
        p[j] = pj + neg_lr * d


# ---------------------------------------------------------------- any band b


@njit(**_OPTS)
def band_stats(g, m, band, omb1, b2, omb2, bc1, bc2, graft_eps, graft, norms_out, chunk):
    n = g.size
    b = band.shape[1] - 1
    nchunks = norms_out.size
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = 0.0
        for j in range(lo, hi):
            gj = g[j]
            mj = m[j] + omb1 * (gj - m[j])
            m[j] = mj
            for k in range(b + 1):
                if j + k < n:
                    band[j, k] = band[j, k] * b2 + omb2 * (gj * g[j + k])
                else:
                    band[j, k] = band[j, k] * b2
            if graft == 1:
                a = (mj / bc1) / (np.sqrt(band[j, 0] / bc2) + graft_eps)
                acc += float(a) * float(a)
            elif graft == 2:
                acc += float(gj) * float(gj)
            elif graft == 3:
                mh = mj / bc1
                acc += float(mh) * float(mh)
        norms_out[c] = acc


@njit(**_OPTS)
def band_rowmax(band, bc2, rows_out, chunk):
    n = band.shape[0]
    b = band.shape[1] - 1
    nchunks = rows_out.size
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        rmax = bc2 * 0
        for j in range(lo, hi):
            r = band[j, 0] / bc2
            for k in range(1, b + 1):
                if j + k < n:
                    r = r + abs(band[j, k] / bc2)
            for k in range(1, b + 1):
                if j - k >= 0:
                    r = r + abs(band[j - k, k] / bc2)
            if r > rmax:
                rmax = r
        rows_out[c] = rmax


@njit(**_OPTS)
def band_factor_lt(m, band, psi, t, bc1, bc2, eps_eff, tau, removed_out, fallback_out, chunk):
    """Per row: ``LDLᵀ`` of the window, prefix Schur complements, fallback, ψ; ``t = D⁻¹ Lᵀ m̂``."""
    n = band.shape[0]
    b = band.shape[1] - 1
    nchunks = removed_out.size
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        A = np.empty((b, b), dtype=band.dtype)
        L = np.zeros((b, b), dtype=band.dtype)
        d = np.empty(b, dtype=band.dtype)
        okv = np.empty(b, dtype=np.bool_)
        z = np.empty(b, dtype=band.dtype)
        wv = np.empty(b, dtype=band.dtype)
        ps = np.empty(b, dtype=band.dtype)
        one = bc2 / bc2
        zero = bc2 * 0
        removed = 0
        fallback = 0
        for j in range(lo, hi):
            # window A[a, c] = H[j+1+a, j+1+c] (padded rows: H_ii = 1, no couplings)
            for a in range(b):
                for cc in range(a, b):
                    ia = j + 1 + a
                    ic = j + 1 + cc
                    if ic < n:
                        v = band[ia, cc - a] / bc2
                        if a == cc:
                            v = v + eps_eff
                    elif a == cc:
                        v = one
                    else:
                        v = zero
                    A[a, cc] = v
                    A[cc, a] = v
            for i in range(b):
                aii = A[i, i]
                di = aii
                for l_ in range(i):
                    di = di - L[i, l_] * (L[i, l_] * d[l_])
                okv[i] = di > tau * aii
                if not okv[i]:
                    di = aii
                d[i] = di
                for r in range(i + 1, b):
                    w = A[r, i]
                    for l_ in range(i):
                        w = w - L[r, l_] * (L[i, l_] * d[l_])
                    L[r, i] = w / di
            d0 = band[j, 0] / bc2 + eps_eff
            s = d0
            alive = True
            kept = 0
            for i in range(b):
                if j + 1 + i < n:
                    zi = band[j, i + 1] / bc2
                else:
                    zi = zero
                for l_ in range(i):
                    zi = zi - L[i, l_] * z[l_]
                z[i] = zi
                wi = zi / d[i]
                s_next = s - zi * wi
                if alive:
                    alive = okv[i] and (s_next > tau * d0)
                if alive:
                    s = s_next
                    kept += 1
                else:
                    wi = zero
                wv[i] = wi
            real = min(b, n - 1 - j)
            if kept < real:
                removed += real - kept
                fallback += 1
            for i in range(b - 1, -1, -1):
                pi = wv[i]
                for r in range(i + 1, b):
                    pi = pi - L[r, i] * ps[r]
                ps[i] = pi
            acc = m[j] / bc1
            for k in range(1, b + 1):
                if j + k < n:
                    psi[j, k - 1] = ps[k - 1]
                    acc = acc - ps[k - 1] * (m[j + k] / bc1)
                else:
                    psi[j, k - 1] = zero
            t[j] = acc / s
        removed_out[c] = removed
        fallback_out[c] = fallback


@njit(**_OPTS)
def band_l_apply(p, psi, t, u, neg_lr, wd, write_p, norms_out, chunk):
    """``y = L t`` (``y_j = t_j - Σ_k ψ_{j-k}[k] t_{j-k}``); writes p (no graft) or u and ‖y‖²."""
    n = t.size
    b = psi.shape[1]
    nchunks = norms_out.size
    for c in prange(nchunks):
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = 0.0
        for j in range(lo, hi):
            y = t[j]
            for k in range(1, b + 1):
                if j - k >= 0:
                    y = y - psi[j - k, k - 1] * t[j - k]
            if write_p:
                pj = p[j]
                if wd != 0:
                    p[j] = pj + neg_lr * (y + wd * pj)
                else:
                    p[j] = pj + neg_lr * y
            else:
                u[j] = y
                acc += float(y) * float(y)
        norms_out[c] = acc


# ---------------------------------------------------------------- driver

_SCRATCH: dict = {}


def _scratch(key, shape, dtype):
    """Reused scratch arrays (not state): allocated once per (purpose, shape, dtype)."""
    k = (key, shape, np.dtype(dtype).str)
    a = _SCRATCH.get(k)
    if a is None:
        if len(_SCRATCH) > 64:
            _SCRATCH.clear()
        a = _SCRATCH[k] = np.empty(shape, dtype=dtype)
    return a


def run(backend, opt, params, grads, mus, bands, scalars, g_views=None):
    """One SONew step on every leaf, in place; returns ``[(removed_edges, fallback_rows)]`` per leaf."""
    lr, bc1, bc2 = scalars
    p_views = backend.views(params)
    g_views = g_views if g_views is not None else backend.views(grads)
    m_views = backend.views(mus)
    b_views = [(bd.detach().numpy() if type(bd).__module__.startswith("torch") else bd) for bd in bands]
    graft = GRAFT_CODES[opt.graft]
    out = []
    for p, g, m, band in zip(p_views, g_views, m_views, b_views):
        cast = p.dtype.type
        n = p.size
        b = band.shape[1] - 1
        tau = cast(opt._tau(p.dtype))
        chunk = CHUNK
        nchunks = (n + chunk - 1) // chunk
        norms = np.zeros(nchunks, np.float64)
        rows = np.zeros(nchunks, p.dtype)
        removed = np.zeros(nchunks, np.int64)
        omb1, b2, omb2 = cast(1.0 - opt.b1), cast(opt.b2), cast(1.0 - opt.b2)
        cbc1, cbc2, geps = cast(bc1), cast(bc2), cast(opt.graft_eps)
        if b == 1:
            saved = _scratch("saved", (nchunks,), p.dtype)
            _save_boundaries(band, nchunks, chunk, saved)
            tri_stats(g, m, band, saved, omb1, b2, omb2, cbc1, cbc2, geps, graft, rows, norms, chunk)
        else:
            band_stats(g, m, band, omb1, b2, omb2, cbc1, cbc2, geps, graft, norms, chunk)
            if opt.relative_eps:
                band_rowmax(band, cbc2, rows, chunk)
        target = float(np.sqrt(norms.sum()))
        if opt.relative_eps:
            eps_eff = max(cast(opt.eps) * rows.max(), cast(opt.eps_min))
        else:
            eps_eff = opt.eps
        eps_eff = cast(eps_eff)
        write_p = graft == 0
        neg_lr, wd = cast(-lr), cast(opt.weight_decay)
        u = p if write_p else _scratch("u", (n,), p.dtype)
        if b == 1:
            tri_precond(p, m, band, u, cbc1, cbc2, eps_eff, tau, neg_lr, wd, write_p, norms, removed, chunk)
            fallback = int(removed.sum())
            edges = fallback
        elif b == 0:
            # diag-SONew: X = diag(1/H_jj); reuse the band kernels with an empty window
            psi = _scratch("psi", (n, 0), p.dtype)
            t = _scratch("t", (n,), p.dtype)
            band_factor_lt(m, band, psi, t, cbc1, cbc2, eps_eff, tau, removed, removed.copy(), chunk)
            band_l_apply(p, psi, t, u, neg_lr, wd, write_p, norms, chunk)
            edges = fallback = 0
        else:
            psi = _scratch("psi", (n, b), p.dtype)
            t = _scratch("t", (n,), p.dtype)
            rows_fb = np.zeros(nchunks, np.int64)
            band_factor_lt(m, band, psi, t, cbc1, cbc2, eps_eff, tau, removed, rows_fb, chunk)
            band_l_apply(p, psi, t, u, neg_lr, wd, write_p, norms, chunk)
            edges, fallback = int(removed.sum()), int(rows_fb.sum())
        if not write_p:
            un = float(np.sqrt(norms.sum()))
            scale = cast(target / un if un > 0 else 0.0)
            scaled_apply(p, u, scale, neg_lr, wd)
        out.append((edges, fallback))
    return out

