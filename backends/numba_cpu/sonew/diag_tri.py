"""Whole-tensor SONew kernels for the diagonal (``b = 0``) and tridiagonal (``b = 1``) bands.

Same arithmetic, in the same order, as the reference ``SONew.flat_leaf`` and
``arrayopt.sonew.math``, in place on flat views; scalars arrive typed in the param dtype,
so no float64 constant promotes float32 math (norm accumulators are float64, which only
makes them more accurate). Each parallel kernel runs its ``<name>_chunk`` body over chunks
of the vector (each chunk in one thread, sequential inside, so neighbours' values travel in
registers); block-local SONew calls the same bodies on one block.

Tridiagonal (``b = 1``), three passes (the old statistics at chunk boundaries are saved
before the parallel pass, :func:`save_boundaries`):

1. ``tri_stats``: ``m``, ``band`` updated in place; the band ∞-norm of ``Ĥ``
   (relative eps) and the graft's target norm;
2. ``tri_precond``: factor (edge removal) and ``u = X m̂`` in one sweep; with no
   graft it writes the params directly, otherwise ``u`` to a scratch vector and
   ``‖u‖``;
3. ``scaled_apply``: ``p ← p - lr (c u + λ p)``.

Diagonal (``b = 0``): ``diag_stats`` (``m``, ``H_jj``, max and graft norm²), then
``diag_apply`` (``u_j = m̂_j/(Ĥ_jj + ε)``), then ``scaled_apply`` with a graft.

Vectorisation rules used below: inner loops index block-local views from 0 (so
LLVM can drop Numba's negative-index wraparound selects), carry no value from
one element to the next (neighbours go through small L1 buffers), and leave the
reductions (max row sum on the bit patterns, float64 norms in SIMD lanes) to
the helpers of ``numba_cpu/_common.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._common import OPTS, SERIAL, max_nonneg, sum_prefix, sumsq
from .grafts import GRAFT_ADAM, GRAFT_MOMENTUM, GRAFT_NONE, GRAFT_SGD

__all__ = ["BLK", "save_boundaries", "tri_stats", "tri_stats_chunk", "tri_precond", "tri_precond_chunk",
           "scaled_apply", "diag_stats", "diag_stats_chunk", "diag_apply", "diag_apply_chunk"]

BLK = 1024  # rows per L1-resident sub-block inside a chunk


@njit(**SERIAL)
def save_boundaries(band, nchunks, chunk, saved):
    """``saved[c] = band[c·chunk - 1, 1]``: the old off-diagonal before each chunk."""
    for c in range(1, nchunks):
        saved[c] = band[c * chunk - 1, 1]


@njit(**SERIAL)
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
        if graft == GRAFT_ADAM:
            for i in range(k):
                abuf[i] = (mb[i] / bc1) / (np.sqrt(hb[W + i]) + graft_eps)
        elif graft == GRAFT_SGD:
            for i in range(k):
                abuf[i] = gb[i]
        elif graft == GRAFT_MOMENTUM:
            for i in range(k):
                abuf[i] = mb[i] / bc1
        rmax = max_nonneg(rbuf, k, rmax)
        if graft != GRAFT_NONE:  # Σ float64(a_i)²
            acc += sumsq(abuf, 0, k)
    rows_out[c] = rmax
    norms_out[c] = acc


@njit(**OPTS)
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


@njit(**SERIAL)
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
            acc += sumsq(ub, 0, k)
        psi_prev = buf[3 * W + k]
        t_prev = buf[4 * W + k]
    norms_out[c] = acc
    removed_out[c] = removed


@njit(**OPTS)
def tri_precond(p, m, bf, u, bc1, bc2, eps_eff, tau, neg_lr, wd, write_p, norms_out, removed_out, chunk):
    """Pass 2 (b = 1): ψ, s (edge removal), ``y = L D Lᵀ m̂``; writes p (no graft) or u.

    Per sub-block: ``Ĥ`` and ``m̂`` divided once into an L1 buffer, a loop computing ``ψ_j``
    and ``t_j = (m̂_j - ψ_j m̂_{j+1})/s_j`` (slot 0 holds row ``blo-1``), then
    ``y_j = t_j - ψ_{j-1} t_{j-1}`` and the store, then ``‖y‖²``: all of them vectorise.
    """
    nchunks = norms_out.size
    for c in prange(nchunks):
        tri_precond_chunk(p, m, bf, u, bc1, bc2, eps_eff, tau, neg_lr, wd, write_p, norms_out, removed_out, chunk, c)



@njit(**OPTS)
def scaled_apply(p, u, scale, neg_lr, wd):
    """``p ← p + (-lr) (scale·u + λ p)`` (the grafted update)."""
    for j in prange(p.size):
        pj = p[j]
        d = u[j] * scale
        if wd != 0:
            d = d + wd * pj
        p[j] = pj + neg_lr * d


# ---------------------------------------------------------------- diagonal (b = 0)


@njit(**SERIAL)
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
            if graft == GRAFT_ADAM:
                a = (mj / bc1) / (np.sqrt(hj / bc2) + graft_eps)
                buf[i] = float(a) * float(a)
            elif graft == GRAFT_SGD:
                buf[i] = float(gj) * float(gj)
            elif graft == GRAFT_MOMENTUM:
                mh = mj / bc1
                buf[i] = float(mh) * float(mh)
        if graft != GRAFT_NONE:
            acc += sum_prefix(buf, k)
        rmax = max_nonneg(rbuf, k, rmax)
    norms_out[c] = acc
    rows_out[c] = rmax


@njit(**OPTS)
def diag_stats(g, m, h, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk):
    """``m``, ``H_jj`` updates; per chunk the max of ``H_jj/bc2`` and the graft norm² (L1 sub-blocks)."""
    nchunks = norms_out.size
    for c in prange(nchunks):
        diag_stats_chunk(g, m, h, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk, c)


@njit(**SERIAL)
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
            acc += sumsq(us, 0, k)
    norms_out[c] = acc


@njit(**OPTS)
def diag_apply(p, m, h, u, bc1, bc2, eps_eff, neg_lr, wd, write_p, norms_out, chunk):
    """``y_j = (m_j/bc1) / (H_jj/bc2 + ε)``; writes p (no graft) or u and ‖y‖² per chunk."""
    nchunks = norms_out.size
    for c in prange(nchunks):
        diag_apply_chunk(p, m, h, u, bc1, bc2, eps_eff, neg_lr, wd, write_p, norms_out, chunk, c)


