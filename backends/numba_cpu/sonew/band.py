"""Whole-tensor SONew kernels for any band ``b`` (the generic path; ``b > 8`` runs them).

Statistics (``band_stats``: ``m``, the band of ``EMA(g gᵀ)``, the graft's norm²), the band
∞-norm (``band_rowmax``), then one batched kernel that factors every row's ``b×b`` window
(unpivoted ``LDLᵀ`` with the per-row bandwidth fallback) and applies ``Lᵀ`` and ``D``
(``band_factor_lt``), then ``L`` and the update (``band_l_apply``). The kernels unrolled for
``2 <= b <= 8`` (``_gen_band_kernels.py``) do the same operations in the same order (bit for
bit) and call :func:`band_row` for the rows whose window reaches past ``n``. Each parallel
kernel runs its ``<name>_chunk`` body over chunks of rows; block-local SONew calls the bodies
on one block. The band factor runs ``RB`` rows side by side, each row's arithmetic in the
scalar order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._common import OPTS, SERIAL
from .grafts import GRAFT_ADAM, GRAFT_MOMENTUM, GRAFT_SGD

__all__ = ["RB", "band_stats", "band_stats_chunk", "band_rowmax", "band_rowmax_chunk", "save_band_rows",
           "band_row", "band_rows_scalar", "band_factor_lt", "band_factor_lt_chunk", "band_l_apply",
           "band_l_apply_chunk"]



@njit(**SERIAL)
def band_stats_chunk(g, m, band, omb1, b2, omb2, bc1, bc2, graft_eps, graft, norms_out, chunk, bs, c):
    """Chunk ``c`` of :func:`band_stats`, serial (the body of its ``prange`` loop)."""
    n = g.size
    b = band.shape[1] - 1
    nchunks = norms_out.size
    lo = c * chunk
    hi = min(lo + chunk, n)
    acc = 0.0
    for j in range(lo, hi):
        gj = g[j]
        mj = m[j] + omb1 * (gj - m[j])
        m[j] = mj
        for k in range(b + 1):
            if j + k < n and j // bs == (j + k) // bs:
                band[j, k] = band[j, k] * b2 + omb2 * (gj * g[j + k])
            else:
                band[j, k] = band[j, k] * b2
        if graft == GRAFT_ADAM:
            a = (mj / bc1) / (np.sqrt(band[j, 0] / bc2) + graft_eps)
            acc += float(a) * float(a)
        elif graft == GRAFT_SGD:
            acc += float(gj) * float(gj)
        elif graft == GRAFT_MOMENTUM:
            mh = mj / bc1
            acc += float(mh) * float(mh)
    norms_out[c] = acc


@njit(**OPTS)
def band_stats(g, m, band, omb1, b2, omb2, bc1, bc2, graft_eps, graft, norms_out, chunk, bs):
    nchunks = norms_out.size
    for c in prange(nchunks):
        band_stats_chunk(g, m, band, omb1, b2, omb2, bc1, bc2, graft_eps, graft, norms_out, chunk, bs, c)


@njit(**SERIAL)
def band_rowmax_chunk(band, bc2, rows_out, chunk, c):
    """Chunk ``c`` of :func:`band_rowmax`, serial (the body of its ``prange`` loop)."""
    n = band.shape[0]
    b = band.shape[1] - 1
    nchunks = rows_out.size
    lo = c * chunk
    hi = min(lo + chunk, n)
    rmax = bc2 - bc2
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


@njit(**OPTS)
def band_rowmax(band, bc2, rows_out, chunk):
    nchunks = rows_out.size
    for c in prange(nchunks):
        band_rowmax_chunk(band, bc2, rows_out, chunk, c)


@njit(**SERIAL)
def save_band_rows(band, nchunks, chunk, saved):
    """``saved[c] = band[c·chunk - b : c·chunk]`` (old values of the rows before each chunk)."""
    b = band.shape[1] - 1
    for c in range(1, nchunks):
        for q in range(b):
            i = c * chunk - b + q
            if i >= 0:
                for k in range(b + 1):
                    saved[c, q, k] = band[i, k]


@njit(**SERIAL)
def band_row(m, band, j, bc1, bc2, eps_eff, tau, A, L, d, okv, z, wv, ps):
    """Row ``j``: window ``LDLᵀ``, fallback, ``ψ_j`` into ``ps``; returns ``(t_j, kept, real)``.

    The window past ``n`` is padded (``H_ii = 1``, no couplings); ``real`` counts the
    neighbours that exist. Same operations in the same order as the unrolled kernels.
    """
    n = band.shape[0]
    b = band.shape[1] - 1
    one = bc2 / bc2
    zero = bc2 - bc2
    # window A[a, c] = H[j+1+a, j+1+c]
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
    for i in range(b - 1, -1, -1):
        pi = wv[i]
        for r in range(i + 1, b):
            pi = pi - L[r, i] * ps[r]
        ps[i] = pi
    acc = m[j] / bc1
    for k in range(1, b + 1):
        if j + k < n:
            acc = acc - ps[k - 1] * (m[j + k] / bc1)
        else:
            ps[k - 1] = zero
    return acc / s, kept, min(b, n - 1 - j)


@njit(**SERIAL)
def band_rows_scalar(m, band, psi, t, bc1, bc2, eps_eff, tau, lo, hi, A, L, d, okv, z, wv, ps):
    """Rows ``[lo, hi)`` one at a time (the last ``b`` rows, whose windows reach past ``n``)."""
    b = band.shape[1] - 1
    removed = 0
    fallback = 0
    for j in range(lo, hi):
        tj, kept, real = band_row(m, band, j, bc1, bc2, eps_eff, tau, A, L, d, okv, z, wv, ps)
        if kept < real:
            removed += real - kept
            fallback += 1
        for k in range(b):
            psi[j, k] = ps[k]
        t[j] = tj
    return removed, fallback


RB = 128  # rows per batch in the band factorisation (all per-row scalars live in (…, RB) buffers)


@njit(**SERIAL)
def band_factor_lt_chunk(m, band, psi, t, bc1, bc2, eps_eff, tau, removed_out, fallback_out, chunk, c):
    """Chunk ``c`` of :func:`band_factor_lt`, serial (the body of its ``prange`` loop)."""
    n = band.shape[0]
    b = band.shape[1] - 1
    nchunks = removed_out.size
    lo = c * chunk
    hi = min(lo + chunk, n)
    A = np.empty((b, b, RB), dtype=band.dtype)
    L = np.zeros((b, b, RB), dtype=band.dtype)
    d = np.empty((b, RB), dtype=band.dtype)
    okv = np.empty((b, RB), dtype=np.bool_)
    z = np.empty((b, RB), dtype=band.dtype)
    wv = np.empty((b, RB), dtype=band.dtype)
    ps = np.empty((b, RB), dtype=band.dtype)
    sv = np.empty(RB, dtype=band.dtype)
    d0v = np.empty(RB, dtype=band.dtype)
    alive = np.empty(RB, dtype=np.bool_)
    kept = np.empty(RB, dtype=np.int64)
    accv = np.empty(RB, dtype=band.dtype)
    A2 = np.empty((b, b), dtype=band.dtype)
    L2 = np.zeros((b, b), dtype=band.dtype)
    d2 = np.empty(b, dtype=band.dtype)
    ok2 = np.empty(b, dtype=np.bool_)
    z2 = np.empty(b, dtype=band.dtype)
    w2 = np.empty(b, dtype=band.dtype)
    p2 = np.empty(b, dtype=band.dtype)
    zero = bc2 - bc2
    removed = 0
    fallback = 0
    fast_hi = min(hi, n - b)  # rows j with j + b <= n - 1: full window, all neighbours real
    blo = lo
    while blo < fast_hi:
        k = min(RB, fast_hi - blo)
        for a in range(b):
            for cc in range(a, b):
                Aac = A[a, cc]
                col = band[blo + 1 + a:blo + 1 + a + k, cc - a]
                if a == cc:
                    for r in range(k):
                        Aac[r] = col[r] / bc2 + eps_eff
                else:
                    Aca = A[cc, a]
                    for r in range(k):
                        v = col[r] / bc2
                        Aac[r] = v
                        Aca[r] = v
        for i in range(b):
            di = d[i]
            Aii = A[i, i]
            for r in range(k):
                di[r] = Aii[r]
            for l_ in range(i):
                Lil = L[i, l_]
                dl = d[l_]
                for r in range(k):
                    di[r] = di[r] - Lil[r] * (Lil[r] * dl[r])
            oki = okv[i]
            for r in range(k):
                ok = di[r] > tau * Aii[r]
                oki[r] = ok
                di[r] = di[r] if ok else Aii[r]
            for rr in range(i + 1, b):
                Lri = L[rr, i]
                Ari = A[rr, i]
                for r in range(k):
                    Lri[r] = Ari[r]
                for l_ in range(i):
                    Lrl = L[rr, l_]
                    Lil = L[i, l_]
                    dl = d[l_]
                    for r in range(k):
                        Lri[r] = Lri[r] - Lrl[r] * (Lil[r] * dl[r])
                for r in range(k):
                    Lri[r] = Lri[r] / di[r]
        c0 = band[blo:blo + k, 0]
        for r in range(k):
            d0 = c0[r] / bc2 + eps_eff
            d0v[r] = d0
            sv[r] = d0
            alive[r] = True
            kept[r] = 0
        for i in range(b):
            zi = z[i]
            ci = band[blo:blo + k, i + 1]
            for r in range(k):
                zi[r] = ci[r] / bc2
            for l_ in range(i):
                Lil = L[i, l_]
                zl = z[l_]
                for r in range(k):
                    zi[r] = zi[r] - Lil[r] * zl[r]
            di = d[i]
            oki = okv[i]
            wi = wv[i]
            for r in range(k):
                w = zi[r] / di[r]
                s_next = sv[r] - zi[r] * w
                al = alive[r] and oki[r] and (s_next > tau * d0v[r])
                alive[r] = al
                sv[r] = s_next if al else sv[r]
                kept[r] += 1 if al else 0
                wi[r] = w if al else zero
        for r in range(k):
            if kept[r] < b:
                removed += b - kept[r]
                fallback += 1
        for i in range(b - 1, -1, -1):
            pi = ps[i]
            wi = wv[i]
            for r in range(k):
                pi[r] = wi[r]
            for rr in range(i + 1, b):
                Lri = L[rr, i]
                pr = ps[rr]
                for r in range(k):
                    pi[r] = pi[r] - Lri[r] * pr[r]
        mb = m[blo:blo + k + b]
        tb = t[blo:blo + k]
        for r in range(k):
            accv[r] = mb[r] / bc1
        for kk in range(1, b + 1):
            pk = ps[kk - 1]
            ob = psi[blo:blo + k, kk - 1]
            for r in range(k):
                ob[r] = pk[r]
                accv[r] = accv[r] - pk[r] * (mb[r + kk] / bc1)
        for r in range(k):
            tb[r] = accv[r] / sv[r]
        blo += k
    if max(lo, fast_hi) < hi:
        rm, fb = band_rows_scalar(m, band, psi, t, bc1, bc2, eps_eff, tau, max(lo, fast_hi), hi,
                                   A2, L2, d2, ok2, z2, w2, p2)
        removed += rm
        fallback += fb
    removed_out[c] = removed
    fallback_out[c] = fallback


@njit(**OPTS)
def band_factor_lt(m, band, psi, t, bc1, bc2, eps_eff, tau, removed_out, fallback_out, chunk):
    """Per row: ``LDLᵀ`` of the window, prefix Schur complements, fallback, ψ; ``t = D⁻¹ Lᵀ m̂``.

    Rows are processed in batches of ``RB``: every scalar of the per-row algorithm
    becomes a length-``RB`` buffer and every step a loop over the batch, so the
    ``b×b`` factorisations of ``RB`` rows run side by side in SIMD lanes. The
    arithmetic of each row is the scalar algorithm's, in the same order (bit for
    bit). Rows whose window reaches past ``n`` (the last ``b``) take the scalar path.
    """
    nchunks = removed_out.size
    for c in prange(nchunks):
        band_factor_lt_chunk(m, band, psi, t, bc1, bc2, eps_eff, tau, removed_out, fallback_out, chunk, c)


@njit(**SERIAL)
def band_l_apply_chunk(p, psi, t, u, neg_lr, wd, write_p, norms_out, chunk, c):
    """Chunk ``c`` of :func:`band_l_apply`, serial (the body of its ``prange`` loop)."""
    n = t.size
    b = psi.shape[1]
    nchunks = norms_out.size
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


@njit(**OPTS)
def band_l_apply(p, psi, t, u, neg_lr, wd, write_p, norms_out, chunk):
    """``y = L t`` (``y_j = t_j - Σ_k ψ_{j-k}[k] t_{j-k}``); writes p (no graft) or u and ‖y‖²."""
    nchunks = norms_out.size
    for c in prange(nchunks):
        band_l_apply_chunk(p, psi, t, u, neg_lr, wd, write_p, norms_out, chunk, c)


