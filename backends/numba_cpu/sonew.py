"""Fused Numba kernels for SONew (``arrayopt.sonew``), in place on flat views.

Same arithmetic, in the same order, as the reference ``SONew.flat_leaf`` and
``arrayopt.sonew.math``; scalars arrive typed in the param dtype, so no
float64 constant promotes float32 math (norm accumulators are float64, which
only makes them more accurate). ``fastmath`` only on the reductions (``_REDUCE``:
``reassoc``, ``nsz``), so their float64 sums run in SIMD lanes; every element-wise
operation stays IEEE and in the reference's order.

Tridiagonal (``b = 1``), three passes over chunks of the vector (each chunk in
one thread, sequential inside, so neighbours' values travel in registers; the
old statistics at chunk boundaries are saved before the parallel pass):

1. ``tri_stats``: ``m``, ``band`` updated in place; the band ∞-norm of ``Ĥ``
   (relative eps) and the graft's target norm;
2. ``tri_precond``: factor (edge removal) and ``u = X m̂`` in one sweep; with no
   graft it writes the params directly, otherwise ``u`` to a scratch vector and
   ``‖u‖``;
3. ``scaled_apply``: ``p ← p - lr (c u + λ p)``.

Band ``2 <= b <= 8``: kernels unrolled for that ``b`` in ``sonew_band_kernels.py``
(written by ``band_codegen.py``; same operations as the generic ones below, bit for
bit): statistics with row sums in one pass, then window factors and ``L D Lᵀ m̂``
in one pass without storing ``ψ``. Any larger band (``band_*``): statistics,
∞-norm, then one batched kernel that factors every row's ``b×b`` window
(unpivoted ``LDLᵀ`` with the per-row bandwidth fallback) and applies ``Lᵀ`` and
``D``, then ``L`` and the update.

Vectorisation rules used below: inner loops index block-local views from 0 (so
LLVM can drop Numba's negative-index wraparound selects), carry no value from
one element to the next (neighbours go through small L1 buffers), and leave the
reductions (max row sum on the bit patterns, float64 norms in SIMD lanes) to
small helpers; the band
factor runs ``RB`` rows side by side, each row's arithmetic in the scalar order.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..._xp import library_of
from ...grafting import graft_scale

_OPTS = dict(parallel=True, cache=True, nogil=True, boundscheck=False, error_model="numpy")
_SERIAL = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy")
# reductions only: float64 sums reassociated into SIMD lanes (the order of a sum changes, by
# float64 rounding; no flag that assumes finite values, so NaN/Inf propagate as without it)
_REDUCE = dict(_SERIAL, fastmath={"reassoc", "nsz"})

GRAFT_CODES = {"none": 0, "adam": 1, "sgd": 2, "momentum": 3}
CHUNK = 16384


@njit(**_SERIAL)
def _save_boundaries(band, nchunks, chunk, saved):
    for c in range(1, nchunks):
        saved[c] = band[c * chunk - 1, 1]


BLK = 1024  # rows per L1-resident sub-block inside a chunk


@njit(**_REDUCE)
def _sum(buf, k):
    """``Σ buf[:k]`` (float64), reassociated into SIMD lanes (``_REDUCE``)."""
    s = 0.0
    for i in range(k):
        s += buf[i]
    return s


@njit(**_SERIAL)
def _max_bits(bits, k):
    """``max(0, bits[:k])`` (integers: vectorises without fast-math flags)."""
    m = bits[0] - bits[0]
    for i in range(k):
        m = max(m, bits[i])
    return m


@njit(**_SERIAL)
def _nonneg_from_bits(m, mant_bits, exp_all_ones, bias):
    """The value (float64, exact) of the non-negative IEEE float with bit pattern ``m`` (int64).

    ``mant_bits``, ``exp_all_ones``, ``bias``: 23, 255, 127 (float32) or 52, 2047, 1023
    (float64). A NaN pattern gives NaN.
    """
    one = np.int64(1) << mant_bits
    e = m >> mant_bits
    f = m & (one - 1)
    if e == 0:  # zero and subnormals: f·2^(1-bias-mant_bits)
        return math.ldexp(float(f), 1 - bias - mant_bits)
    if e == exp_all_ones:
        return math.inf if f == 0 else math.nan
    return math.ldexp(float(f | one), int(e) - bias - mant_bits)


@njit(**_SERIAL)
def _max_nonneg(buf, k, start):
    """``max(start, buf[:k])`` of values ``>= 0``, exact, with no allocation.

    Non-negative floats order as their IEEE bit patterns do as integers, and an integer
    max vectorises without any fast-math flag; the largest pattern is then decoded into
    its value (exactly: a float64 ``ldexp`` of an integer mantissa). A NaN is ignored
    (``v > start`` is false), as the scalar loop did.
    """
    if k <= 0:
        return start
    if buf.itemsize == 4:
        v = buf.dtype.type(_nonneg_from_bits(np.int64(_max_bits(buf[:k].view(np.int32), k)), 23, 255, 127))
    else:
        v = buf.dtype.type(_nonneg_from_bits(_max_bits(buf[:k].view(np.int64), k), 52, 2047, 1023))
    return v if v > start else start


@njit(**_SERIAL)
def tri_stats_chunk(g, m, bf, saved, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk, bs, c):
    """Chunk ``c`` of :func:`tri_stats`, serial (the body of its ``prange`` loop)."""
    n = g.size
    nchunks = rows_out.size
    lo = c * chunk
    hi = min(lo + chunk, n)
    rbuf = np.empty(BLK, dtype=bf.dtype)
    abuf = np.empty(BLK, dtype=bf.dtype)
    W = BLK + 1
    hb = np.empty(2 * W, dtype=bf.dtype)  # |Ĥ_j-1,j| for rows blo-1.., then Ĥ_jj for rows blo..
    # new off-diagonal of row lo-1 (its old value saved before this pass)
    if lo > 0 and lo % bs != 0:
        e_first = (saved[c] * b2 + omb2 * (g[lo - 1] * g[lo])) / bc2
    elif lo > 0:
        e_first = (saved[c] * b2) / bc2
    else:
        e_first = omb2 - omb2  # typed zero
    rmax = e_first - e_first
    acc = 0.0
    for blo in range(lo, hi, BLK):
        bhi = min(blo + BLK, hi)
        k = bhi - blo
        kt = min(bhi, n - 1) - blo      # rows with a right neighbour
        gb = g[blo:min(bhi + 1, n)]
        mb = m[blo:bhi]
        bb = bf[2 * blo:2 * bhi]
        s0 = 0
        while s0 < kt:  # segments of rows whose right neighbour is in their block
            bend = min(((blo + s0) // bs + 1) * bs, n) - blo
            s1 = min(kt, bend - 1)
            gs = gb[s0:]  # views from s0: indices provably >= 0, the loop vectorises
            ms = mb[s0:]
            bs_ = bb[2 * s0:]
            for x in range(s1 - s0):
                gj = gs[x]
                mj = ms[x] + omb1 * (gj - ms[x])
                ms[x] = mj
                bs_[2 * x] = bs_[2 * x] * b2 + omb2 * (gj * gj)
                bs_[2 * x + 1] = bs_[2 * x + 1] * b2 + omb2 * (gj * gs[x + 1])
            if s1 < kt:  # the last row of a block: no coupling to the next block
                i = s1
                gj = gb[i]
                mj = mb[i] + omb1 * (gj - mb[i])
                mb[i] = mj
                bb[2 * i] = bb[2 * i] * b2 + omb2 * (gj * gj)
                bb[2 * i + 1] = bb[2 * i + 1] * b2
                s1 += 1
            s0 = s1
        if kt < k:  # the last row: no right neighbour
            i = kt
            gj = gb[i]
            mj = mb[i] + omb1 * (gj - mb[i])
            mb[i] = mj
            bb[2 * i] = bb[2 * i] * b2 + omb2 * (gj * gj)
            bb[2 * i + 1] = bb[2 * i + 1] * b2
        # row sums: left neighbour of row blo from e_first (chunk start) or the previous block
        if blo == lo:
            ep0 = e_first
        else:
            ep0 = bf[2 * blo - 1] / bc2
        hb[0] = abs(ep0)
        for i in range(k):  # Ĥ_jj and |Ĥ_j,j+1|, each divided once
            hb[W + i] = bb[2 * i] / bc2
            hb[1 + i] = abs(bb[2 * i + 1] / bc2)
        for i in range(k):
            rbuf[i] = hb[W + i] + hb[1 + i] + hb[i]
        if graft == 1:
            for i in range(k):
                abuf[i] = (mb[i] / bc1) / (np.sqrt(hb[W + i]) + graft_eps)
        elif graft == 2:
            for i in range(k):
                abuf[i] = gb[i]
        elif graft == 3:
            for i in range(k):
                abuf[i] = mb[i] / bc1
        rmax = _max_nonneg(rbuf, k, rmax)
        if graft != 0:  # Σ float64(a_i)²
            acc += _sumsq(abuf, 0, k)
    rows_out[c] = rmax
    norms_out[c] = acc


@njit(**_OPTS)
def tri_stats(g, m, bf, saved, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk, bs):
    """Pass 1 (b = 1): moments in place; per-chunk max row sum of |Ĥ| and graft norm².

    ``bf`` is the band flattened (``bf[2j] = d_j``, ``bf[2j+1] = e_j``). Chunks run in
    reverse order (the finiteness pre-pass just streamed ``g`` forwards, so its tail is
    still in the last-level cache). Per sub-block: an element-wise update loop, then a
    read-only loop (row sums, graft terms into L1 buffers), then the two reductions:
    no loop carries a value from one element to the next, so both loops vectorise.
    ``bs``: the block size (``n`` for none): the edge from a block's last row to the
    next block takes no gradient product (``block_size`` of ``arrayopt.sonew``).
    """
    nchunks = rows_out.size
    for cc in prange(nchunks):
        c = nchunks - 1 - cc
        tri_stats_chunk(g, m, bf, saved, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk, bs, c)


@njit(**_SERIAL)
def tri_precond_chunk(p, m, bf, u, bc1, bc2, eps_eff, tau, neg_lr, wd, write_p, norms_out, removed_out, chunk, c):
    """Chunk ``c`` of :func:`tri_precond`, serial (the body of its ``prange`` loop)."""
    n = m.size
    nchunks = norms_out.size
    zero = eps_eff - eps_eff
    lo = c * chunk
    hi = min(lo + chunk, n)
    W = BLK + 1
    # one flat L1 buffer (fixed offsets, so LLVM sees one object): D = Ĥ_jj + ε, E = Ĥ_j,j+1,
    # m̂ for rows blo..blo+k, then ψ and t for rows blo-1..blo+k-1
    buf = np.empty(5 * W, dtype=bf.dtype)
    acc = 0.0
    removed = 0
    # t_{lo-1} and ψ_{lo-1}, recomputed (read-only pass: no race)
    t_prev = zero
    psi_prev = zero
    if lo > 0:
        i = lo - 1
        d0 = bf[2 * i] / bc2 + eps_eff
        z = bf[2 * i + 1] / bc2
        dn = bf[2 * i + 2] / bc2 + eps_eff
        w = z / dn
        s = d0 - z * w
        if not (s > tau * d0):
            w = zero
            s = d0
        psi_prev = w
        t_prev = (m[i] / bc1 - w * (m[i + 1] / bc1)) / s
    for blo in range(lo, hi, BLK):
        bhi = min(blo + BLK, hi)
        k = bhi - blo
        kt = min(bhi, n - 1) - blo      # rows with a right neighbour
        nq = min(k + 1, n - blo)
        mb = m[blo:blo + nq]
        bb = bf[2 * blo:2 * (blo + nq)]
        for q in range(nq):  # every division by bc1, bc2 once per element
            buf[q] = bb[2 * q] / bc2 + eps_eff
            buf[W + q] = bb[2 * q + 1] / bc2
            buf[2 * W + q] = mb[q] / bc1
        buf[3 * W] = psi_prev
        buf[4 * W] = t_prev
        for i in range(kt):
            z = buf[W + i]
            w = z / buf[i + 1]
            d0 = buf[i]
            s = d0 - z * w
            keep = s > tau * d0
            removed += 0 if keep else 1
            w = w if keep else zero
            s = s if keep else d0
            buf[3 * W + 1 + i] = w
            buf[4 * W + 1 + i] = (buf[2 * W + i] - w * buf[2 * W + i + 1]) / s
        if kt < k:  # the last row: no right neighbour
            i = kt
            buf[3 * W + 1 + i] = zero
            buf[4 * W + 1 + i] = buf[2 * W + i] / buf[i]
        if write_p:
            pb = p[blo:bhi]
            if wd != 0:
                for i in range(k):
                    y = buf[4 * W + 1 + i] - buf[3 * W + i] * buf[4 * W + i]
                    pj = pb[i]
                    pb[i] = pj + neg_lr * (y + wd * pj)
            else:
                for i in range(k):
                    y = buf[4 * W + 1 + i] - buf[3 * W + i] * buf[4 * W + i]
                    pb[i] = pb[i] + neg_lr * y
        else:
            ub = u[blo:bhi]
            for i in range(k):
                ub[i] = buf[4 * W + 1 + i] - buf[3 * W + i] * buf[4 * W + i]
            acc += _sumsq(ub, 0, k)
        psi_prev = buf[3 * W + k]
        t_prev = buf[4 * W + k]
    norms_out[c] = acc
    removed_out[c] = removed


@njit(**_OPTS)
def tri_precond(p, m, bf, u, bc1, bc2, eps_eff, tau, neg_lr, wd, write_p, norms_out, removed_out, chunk):
    """Pass 2 (b = 1): ψ, s (edge removal), ``y = L D Lᵀ m̂``; writes p (no graft) or u.

    Per sub-block: ``Ĥ`` and ``m̂`` divided once into an L1 buffer, a loop computing ``ψ_j``
    and ``t_j = (m̂_j - ψ_j m̂_{j+1})/s_j`` (slot 0 holds row ``blo-1``), then
    ``y_j = t_j - ψ_{j-1} t_{j-1}`` and the store, then ``‖y‖²``: all of them vectorise.
    """
    nchunks = norms_out.size
    for c in prange(nchunks):
        tri_precond_chunk(p, m, bf, u, bc1, bc2, eps_eff, tau, neg_lr, wd, write_p, norms_out, removed_out, chunk, c)


@njit(**_REDUCE)
def _sumsq(x, lo, hi):
    """``Σ float64(x[i])²`` over ``[lo, hi)``, reassociated into SIMD lanes (``_REDUCE``)."""
    s = 0.0
    for i in range(lo, hi):
        a = float(x[i])
        s += a * a
    return s


@njit(**_OPTS)
def scaled_apply(p, u, scale, neg_lr, wd):
    """``p ← p + (-lr) (scale·u + λ p)`` (the grafted update)."""
    for j in prange(p.size):
        pj = p[j]
        d = u[j] * scale
        if wd != 0:
            d = d + wd * pj
        p[j] = pj + neg_lr * d


# ---------------------------------------------------------------- diagonal (b = 0)


@njit(**_SERIAL)
def diag_stats_chunk(g, m, h, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk, c):
    """Chunk ``c`` of :func:`diag_stats`, serial (the body of its ``prange`` loop)."""
    n = g.size
    nchunks = norms_out.size
    lo = c * chunk
    hi = min(lo + chunk, n)
    buf = np.zeros(BLK, np.float64)
    rbuf = np.empty(BLK, h.dtype)
    acc = 0.0
    rmax = bc2 - bc2
    for s0 in range(lo, hi, BLK):
        k = min(s0 + BLK, hi) - s0
        gs = g[s0:s0 + k]
        ms = m[s0:s0 + k]
        hs = h[s0:s0 + k]
        for i in range(k):
            gj = gs[i]
            mj = ms[i] + omb1 * (gj - ms[i])
            ms[i] = mj
            hj = hs[i] * b2 + omb2 * (gj * gj)
            hs[i] = hj
            rbuf[i] = hj / bc2
            if graft == 1:
                a = (mj / bc1) / (np.sqrt(hj / bc2) + graft_eps)
                buf[i] = float(a) * float(a)
            elif graft == 2:
                buf[i] = float(gj) * float(gj)
            elif graft == 3:
                mh = mj / bc1
                buf[i] = float(mh) * float(mh)
        if graft != 0:
            acc += _sum(buf, k)
        rmax = _max_nonneg(rbuf, k, rmax)
    norms_out[c] = acc
    rows_out[c] = rmax


@njit(**_OPTS)
def diag_stats(g, m, h, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk):
    """``m``, ``H_jj`` updates; per chunk the max of ``H_jj/bc2`` and the graft norm² (L1 sub-blocks)."""
    nchunks = norms_out.size
    for c in prange(nchunks):
        diag_stats_chunk(g, m, h, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk, c)


@njit(**_SERIAL)
def diag_apply_chunk(p, m, h, u, bc1, bc2, eps_eff, neg_lr, wd, write_p, norms_out, chunk, c):
    """Chunk ``c`` of :func:`diag_apply`, serial (the body of its ``prange`` loop)."""
    n = p.size
    nchunks = norms_out.size
    lo = c * chunk
    hi = min(lo + chunk, n)
    acc = 0.0
    for s0 in range(lo, hi, BLK):
        k = min(s0 + BLK, hi) - s0
        ms = m[s0:s0 + k]
        hs = h[s0:s0 + k]
        ps = p[s0:s0 + k]
        us = u[s0:s0 + k]
        for i in range(k):
            y = (ms[i] / bc1) / (hs[i] / bc2 + eps_eff)
            if write_p:
                pj = ps[i]
                if wd != 0:
                    ps[i] = pj + neg_lr * (y + wd * pj)
                else:
                    ps[i] = pj + neg_lr * y
            else:
                us[i] = y
        if not write_p:
            acc += _sumsq(us, 0, k)
    norms_out[c] = acc


@njit(**_OPTS)
def diag_apply(p, m, h, u, bc1, bc2, eps_eff, neg_lr, wd, write_p, norms_out, chunk):
    """``y_j = (m_j/bc1) / (H_jj/bc2 + ε)``; writes p (no graft) or u and ‖y‖² per chunk."""
    nchunks = norms_out.size
    for c in prange(nchunks):
        diag_apply_chunk(p, m, h, u, bc1, bc2, eps_eff, neg_lr, wd, write_p, norms_out, chunk, c)


# ---------------------------------------------------------------- any band b


@njit(**_SERIAL)
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
def band_stats(g, m, band, omb1, b2, omb2, bc1, bc2, graft_eps, graft, norms_out, chunk, bs):
    nchunks = norms_out.size
    for c in prange(nchunks):
        band_stats_chunk(g, m, band, omb1, b2, omb2, bc1, bc2, graft_eps, graft, norms_out, chunk, bs, c)


@njit(**_SERIAL)
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


@njit(**_OPTS)
def band_rowmax(band, bc2, rows_out, chunk):
    nchunks = rows_out.size
    for c in prange(nchunks):
        band_rowmax_chunk(band, bc2, rows_out, chunk, c)


@njit(**_SERIAL)
def _save_band_rows(band, nchunks, chunk, saved):
    """``saved[c] = band[c·chunk - b : c·chunk]`` (old values of the rows before each chunk)."""
    b = band.shape[1] - 1
    for c in range(1, nchunks):
        for q in range(b):
            i = c * chunk - b + q
            if i >= 0:
                for k in range(b + 1):
                    saved[c, q, k] = band[i, k]


@njit(**_SERIAL)
def _band_row(m, band, j, bc1, bc2, eps_eff, tau, A, L, d, okv, z, wv, ps):
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


@njit(**_SERIAL)
def _band_rows_scalar(m, band, psi, t, bc1, bc2, eps_eff, tau, lo, hi, A, L, d, okv, z, wv, ps):
    """Rows ``[lo, hi)`` one at a time (the last ``b`` rows, whose windows reach past ``n``)."""
    b = band.shape[1] - 1
    removed = 0
    fallback = 0
    for j in range(lo, hi):
        tj, kept, real = _band_row(m, band, j, bc1, bc2, eps_eff, tau, A, L, d, okv, z, wv, ps)
        if kept < real:
            removed += real - kept
            fallback += 1
        for k in range(b):
            psi[j, k] = ps[k]
        t[j] = tj
    return removed, fallback


RB = 128  # rows per batch in the band factorisation (all per-row scalars live in (…, RB) buffers)


@njit(**_SERIAL)
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
        rm, fb = _band_rows_scalar(m, band, psi, t, bc1, bc2, eps_eff, tau, max(lo, fast_hi), hi,
                                   A2, L2, d2, ok2, z2, w2, p2)
        removed += rm
        fallback += fb
    removed_out[c] = removed
    fallback_out[c] = fallback


@njit(**_OPTS)
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


@njit(**_SERIAL)
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


@njit(**_OPTS)
def band_l_apply(p, psi, t, u, neg_lr, wd, write_p, norms_out, chunk):
    """``y = L t`` (``y_j = t_j - Σ_k ψ_{j-k}[k] t_{j-k}``); writes p (no graft) or u and ‖y‖²."""
    nchunks = norms_out.size
    for c in prange(nchunks):
        band_l_apply_chunk(p, psi, t, u, neg_lr, wd, write_p, norms_out, chunk, c)


# ---------------------------------------------------------------- driver


def run(backend, step, params, grads, mus, bands, g_views=None, nus=None):
    """One SONew step on every leaf, in place; returns ``[(removed_edges, fallback_rows)]`` per leaf.

    ``step``: the frozen ``arrayopt.sonew.step.SONewStep`` of this step (hyperparameters,
    ``lr``, ``bc1``, ``bc2``); nothing is read from the optimizer. Every scratch array is
    allocated here, per call: two threads stepping at once (the kernels release the GIL)
    never share one.
    """
    from . import sonew_band_kernels as unrolled

    from .sonew_blocks import run_blocks

    p_views = backend.views(params)
    g_views = list(g_views) if g_views is not None else backend.views(grads)
    m_views = backend.views(mus)
    nu_views = backend.views(nus) if nus is not None else [None] * len(p_views)
    b_views = [(bd.detach().numpy() if library_of(bd) == "torch" else bd) for bd in bands]
    graft = GRAFT_CODES.get(step.graft, -1)  # -1: only the block driver fuses it
    write_back = []
    if step.order == "F":  # flatten_order="F": the band runs over the first axis fastest
        for i, leaf in enumerate(params):
            shape = tuple(leaf.shape)
            if len(shape) > 1:
                p_nd, m_nd = p_views[i].reshape(shape), m_views[i].reshape(shape)
                p_views[i], m_views[i] = np.ravel(p_nd, order="F"), np.ravel(m_nd, order="F")
                g_views[i] = np.ravel(g_views[i].reshape(shape), order="F")
                write_back.append((p_nd, p_views[i]))
                write_back.append((m_nd, m_views[i]))
                if nu_views[i] is not None:
                    nu_nd = nu_views[i].reshape(shape)
                    nu_views[i] = np.ravel(nu_nd, order="F")
                    write_back.append((nu_nd, nu_views[i]))
    out = []
    for leaf, p, g, m, band, nu in zip(params, p_views, g_views, m_views, b_views, nu_views):
        small = len(tuple(leaf.shape)) <= 1
        if (step.block_size is not None or step.graft not in GRAFT_CODES
                or (small and step.small_param_fallback != "sonew")):
            # block-local (or an option only the block driver fuses: one block of n)
            if not band.flags.c_contiguous:
                raise ValueError("SONew band state: expected a C-contiguous (n, b+1) array")
            bsz = p.size if step.block_size is None else step.block_size
            out.append(run_blocks(step, p, g, m, band, nu, bsz, small))
            continue
        cast = p.dtype.type
        n = p.size
        b = band.shape[1] - 1
        tau = cast(step.tau(p.dtype))
        chunk = CHUNK
        nchunks = (n + chunk - 1) // chunk
        bs = n if step.block_size is None else min(step.block_size, n)  # blocks of the flat vector
        norms = np.zeros(nchunks, np.float64)
        rows = np.zeros(nchunks, p.dtype)
        removed = np.zeros(nchunks, np.int64)
        omb1, b2, omb2 = cast(step.omb1), cast(step.b2), cast(step.omb2)
        cbc1, cbc2, geps = cast(step.bc1), cast(step.bc2), cast(step.graft_eps)
        if not band.flags.c_contiguous:
            raise ValueError("SONew band state: expected a C-contiguous (n, b+1) array")
        if b == 1:
            saved = np.empty(nchunks, p.dtype)
            _save_boundaries(band, nchunks, chunk, saved)
            tri_stats(g, m, band.reshape(-1), saved, omb1, b2, omb2, cbc1, cbc2, geps, graft, rows, norms, chunk,
                      bs)
        elif b == 0:
            diag_stats(g, m, band.reshape(-1), omb1, b2, omb2, cbc1, cbc2, geps, graft, rows, norms, chunk)
        elif b in unrolled.STATS:
            saved = np.empty((nchunks, b, b + 1), p.dtype)
            _save_band_rows(band, nchunks, chunk, saved)
            unrolled.STATS[b](g, m, band.reshape(-1), saved, omb1, b2, omb2, cbc1, cbc2, geps, graft, rows, norms,
                              chunk, bs)
        else:
            band_stats(g, m, band, omb1, b2, omb2, cbc1, cbc2, geps, graft, norms, chunk, bs)
            if step.relative_eps:
                band_rowmax(band, cbc2, rows, chunk)
        target = float(np.sqrt(norms.sum()))
        # ε_eff = max(ε·‖Ĥ‖∞, ε_min) in the param dtype (SONewStep.eps_effective)
        eps_eff = cast(step.eps_effective(np, rows.max() if step.relative_eps else None))
        write_p = graft == 0
        neg_lr, wd = cast(-step.lr), cast(step.weight_decay)
        u = p if write_p else np.empty(n, p.dtype)
        if b == 1:
            tri_precond(p, m, band.reshape(-1), u, cbc1, cbc2, eps_eff, tau, neg_lr, wd, write_p, norms, removed, chunk)
            fallback = int(removed.sum())
            edges = fallback
        elif b == 0:
            # diag-SONew: X = diag(1/(H_jj + ε)), one vectorised sweep
            diag_apply(p, m, band.reshape(-1), u, cbc1, cbc2, eps_eff, neg_lr, wd, write_p, norms, chunk)
            edges = fallback = 0
        elif b in unrolled.FACTOR_APPLY:
            rows_fb = np.zeros(nchunks, np.int64)
            unrolled.FACTOR_APPLY[b](p, m, band, u, cbc1, cbc2, eps_eff, tau, neg_lr, wd, write_p, norms, removed,
                                     rows_fb, chunk)
            edges, fallback = int(removed.sum()), int(rows_fb.sum())
        else:
            psi = np.empty((n, b), p.dtype)
            t = np.empty(n, p.dtype)
            rows_fb = np.zeros(nchunks, np.int64)
            band_factor_lt(m, band, psi, t, cbc1, cbc2, eps_eff, tau, removed, rows_fb, chunk)
            band_l_apply(p, psi, t, u, neg_lr, wd, write_p, norms, chunk)
            edges, fallback = int(removed.sum()), int(rows_fb.sum())
        if not write_p:
            # graft scale ‖a‖/‖u‖, 0 when ‖u‖ = 0 (arrayopt.grafting.graft_scale), float64 norms
            scale = cast(graft_scale(np, np.float64(target), np.float64(np.sqrt(norms.sum()))))
            scaled_apply(p, u, scale, neg_lr, wd)
        out.append((edges, fallback))
    for x_nd, x_f in write_back:
        x_nd[...] = x_f.reshape(x_nd.shape, order="F")
    return out
