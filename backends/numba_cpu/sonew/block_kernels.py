r"""Block-local SONew kernels (``block_size`` of ``arrayopt.sonew``): one pass over memory, blocks in parallel.

With blocks of ``B`` consecutive entries of the flattened tensor the band is cut
at block edges, ``ε_eff = max(ε·max_{i∈blk} Σ_j |Ĥ_ij|, ε_min)`` and both graft
norms are per block, so a block needs nothing from any other block. Per block
(blocks in parallel, each block sequential in one thread):

1. statistics ``m``, ``B_t`` in place, the block's max row sum and the graft's
   target norm² (the chunk body of the whole-tensor statistics kernel, run on the
   block as one chunk);
2. ``ε_eff``, the factor and ``u = X m̂`` into a block-sized buffer, with ``‖u‖²``
   (the chunk body of the whole-tensor factor/apply kernel);
3. ``p ← p - η (c u + λ p)``, ``c = ‖a‖/‖u‖`` (0 when ``‖u‖ = 0``), while the block
   is still in cache.

``g``, ``m``, the band and ``p`` of a block stay in L2 between the three steps
(``B = 16384`` float32 entries, tridiagonal: ``g, p, m``, two band columns and the
``u`` buffer, ``6·4 B·B = 384 KiB``), so each byte of state crosses the memory bus once per step.
``graft="rmsprop_normalized"`` (``ĝ = g/‖g‖_blk``, ``ν ← β₂ν + (1-β₂)ĝ²``,
``a = ĝ/(√ν + ε_g)``) and ``small_param_fallback="adam"`` (``a = m̂/(√v̂ + ε_g)``
replaces the update) are one more loop over the cached block. The same drivers
with ``B = n`` run those two options for whole tensors (block-local with
``B ≥ n`` is the whole-tensor step).

Diagonal and tridiagonal blocks run fused kernels written here (``diag_block``,
``tri_block``): the statistics sweep and the factor sweep go over L1 tiles of ``TILE``
entries, each loop touching few arrays and carrying nothing from one entry to the
next, so every loop vectorises; ``Ĥ``, ``m̂``, ``ψ``, ``t``, ``u`` live in a scratch
allocated once per thread (a thread takes a contiguous run of blocks). Their arithmetic
is the reference's, operation by operation, except the float64 norms, summed in SIMD
lanes, and, for the diagonal only, ``m̂ = m·(1/bc1)``, ``Ĥ = B·(1/bc2)`` (one rounding
more, ≤ 1 ulp, instead of a division per entry; ``u = m̂/(Ĥ + ε)`` has no cancellation to
amplify it). The tridiagonal block keeps the divisions: its Schur complements and
``m̂_i - ψ_i m̂_{i+1}`` cancel on near-singular windows (rank-one ``Ĥ`` at step 1), where
a 1-ulp change in ``Ĥ`` or ``m̂`` moved updates by 2e-6 relative, over the float32 1e-6
parity rule. Parity with the reference: float32 1e-6, float64 1e-12.

Bands ``b >= 2`` use the drivers in ``_gen_block_drivers.py`` (``blocks_step_<kind>``,
written by ``codegen.py`` from one template so that Numba caches each), which call
the whole-tensor kernels' ``_chunk`` functions on one block (for the generic band through
the adapters ``band_stats_block``, ``band_factor_block`` below):
their arithmetic is the whole-tensor kernels', so the block-local step equals the
reference's to float rounding of the norms (float64 sums here, overflow-safe scaled
float32 sums in the reference).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._common import OPTS, SERIAL, max_nonneg, sum_prefix, sumsq
from .band import band_factor_lt_chunk, band_l_apply_chunk, band_rowmax_chunk, band_stats_chunk
from .grafts import GRAFT_ADAM, GRAFT_MOMENTUM, GRAFT_NONE, GRAFT_RMSPROP_NORMALIZED, GRAFT_SGD

__all__ = ["TILE", "band_stats_block", "band_factor_block", "diag_block", "tri_block", "blocks_step_diag",
           "blocks_step_tri"]

TILE = 1024  # entries per L1 tile inside a block


# ------------------------------------------------ adapters of the chunk kernels (bands >= 2)


@njit(**SERIAL)
def band_stats_block(g, m, bf, saved, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk, bs, c):
    band = bf.reshape((g.size, bf.size // g.size))
    band_stats_chunk(g, m, band, omb1, b2, omb2, bc1, bc2, graft_eps, graft, norms_out, chunk, bs, c)
    band_rowmax_chunk(band, bc2, rows_out, chunk, c)


@njit(**SERIAL)
def band_factor_block(p, m, band, u, bc1, bc2, eps_eff, tau, neg_lr, wd, write_p, norms_out, removed_out,
                 fallback_out, chunk, c):
    psi = np.empty((m.size, band.shape[1] - 1), dtype=band.dtype)
    t = np.empty(m.size, dtype=band.dtype)
    band_factor_lt_chunk(m, band, psi, t, bc1, bc2, eps_eff, tau, removed_out, fallback_out, chunk, c)
    band_l_apply_chunk(p, psi, t, u, neg_lr, wd, write_p, norms_out, chunk, c)


# ------------------------------------------------ fused diag / tridiagonal blocks (one block, serial)
#
# Each loop below touches few arrays, carries nothing from one entry to the next and mixes
# no float64 or int64 into float32 arithmetic (that would halve the SIMD width), so LLVM
# vectorises it at full width; reductions go to ``_common.sumsq``/``_common.sum_prefix`` (float64
# SIMD lanes) and ``_common.max_nonneg`` (bit patterns). The diagonal block multiplies by
# ``1/bc1``, ``1/bc2`` (see the module docstring for why the tridiagonal one divides).


@njit(**SERIAL)
def _adam_sumsq(mh, hd, graft_eps, k, wa):
    """``Σ float64(a_i)²``, ``a = m̂/(√Ĥ_ii + ε_g)`` (the Adam graft's norm²): ``a`` in a loop of
    the param dtype (full SIMD width; a float64 sum in the same loop would halve it), then summed."""
    for i in range(k):
        wa[i] = mh[i] / (np.sqrt(hd[i]) + graft_eps)
    return sumsq(wa, 0, k)


@njit(**SERIAL)
def _graft_partial(gb, mh, hd, lo, hi, graft_eps, graft, wa):
    """``Σ float64(a_i)²`` over entries ``[lo, hi)`` of the block (adam, sgd, momentum grafts)."""
    if graft == GRAFT_ADAM:
        return _adam_sumsq(mh[lo:hi], hd[lo:hi], graft_eps, hi - lo, wa[lo:hi])
    if graft == GRAFT_SGD:  # a slice from 0: a sum starting at ``lo`` does not vectorise (10x slower)
        return sumsq(gb[lo:hi], 0, hi - lo)
    if graft == GRAFT_MOMENTUM:
        return sumsq(mh[lo:hi], 0, hi - lo)
    return 0.0


@njit(**SERIAL)
def _rmsprop_normalized_target(gb, nub, k, b2, omb2, graft_eps, wa):
    """``‖a‖``: ``ĝ = g/‖g‖_blk``, ``ν ← β₂ν + (1-β₂)ĝ²``, ``a = ĝ/(√ν + ε_g)`` (``ν`` in place)."""
    gn = wa.dtype.type(np.sqrt(sumsq(gb, 0, k)))  # one rounding to the param dtype
    gn = gn if gn > 0 else gn - gn + 1
    for i in range(k):
        gh = gb[i] / gn
        v = nub[i] * b2 + (gh * gh) * omb2
        nub[i] = v
        wa[i] = gh / (np.sqrt(v) + graft_eps)
    return np.sqrt(sumsq(wa, 0, k))


@njit(**SERIAL)
def _write_block(pb, ub, mh, hd, k, target, unorm2, graft, adam_fallback, graft_eps, neg_lr, wd):
    """``p ← p - η (c u + λ p)``, ``c = ‖a‖/‖u‖`` (0 when ``‖u‖ = 0``; ``c = 1`` with no graft),
    or the Adam direction ``m̂/(√Ĥ_ii + ε_g)`` for ``small_param_fallback="adam"``."""
    if adam_fallback:
        for i in range(k):
            pj = pb[i]
            d = mh[i] / (np.sqrt(hd[i]) + graft_eps)
            if wd != 0:
                d = d + wd * pj
            pb[i] = pj + neg_lr * d
        return
    if graft == GRAFT_NONE:
        if wd != 0:
            for i in range(k):
                pj = pb[i]
                pb[i] = pj + neg_lr * (ub[i] + wd * pj)
        else:
            for i in range(k):
                pb[i] = pb[i] + neg_lr * ub[i]
        return
    un = np.sqrt(unorm2)
    scale = pb.dtype.type(target / un) if un > 0 else pb.dtype.type(0)
    if wd != 0:
        for i in range(k):
            pj = pb[i]
            pb[i] = pj + neg_lr * (ub[i] * scale + wd * pj)
    else:
        for i in range(k):
            pb[i] = pb[i] + neg_lr * (ub[i] * scale)


@njit(**SERIAL)
def _eps_effective(rmax, eps, eps_min, relative):
    """``max(ε·rowmax, ε_min)`` (relative) or ``ε`` (``SONewStep.eps_effective``)."""
    if not relative:
        return eps
    e = rmax * eps
    return e if e > eps_min else eps_min


@njit(**SERIAL)
def diag_block(pb, gb, mb, hb, nub, k, S, omb1, b2, omb2, ibc1, ibc2, graft_eps, graft, eps, eps_min, relative,
               neg_lr, wd, adam_fallback):
    """One block of diag-SONew: statistics, ``ε_eff``, ``u = m̂/(Ĥ_ii + ε_eff)``, norms, the write.

    ``m̂ = m·(1/bc1)``, ``Ĥ_ii = B_ii·(1/bc2)`` are recomputed where needed (two products, no
    scratch); ``max_i Ĥ_ii = (max_i B_ii)·(1/bc2)`` exactly (rounding is monotone). ``S``:
    scratch rows ``S[0] = u``, ``S[1]``: graft buffer, ``S[2] = Ĥ_ii``, ``S[3] = m̂`` (the
    Adam fallback and the momentum graft only). Both sweeps run in L1 tiles of ``TILE`` entries.
    """
    ub, wa, hd, mh = S[0], S[1], S[2], S[3]
    acc = 0.0
    rmax = ibc2 - ibc2
    for lo in range(0, k, TILE):
        hi = min(lo + TILE, k)
        gs, ms, hs = gb[lo:hi], mb[lo:hi], hb[lo:hi]
        for i in range(hi - lo):
            gj = gs[i]
            ms[i] = ms[i] + omb1 * (gj - ms[i])
            hs[i] = hs[i] * b2 + omb2 * (gj * gj)
        if graft == GRAFT_ADAM:  # a = m̂/(√Ĥ_ii + ε_g) in a float32 loop (8 lanes), then its float64 norm²
            was = wa[lo:hi]
            for i in range(hi - lo):
                was[i] = (ms[i] * ibc1) / (np.sqrt(hs[i] * ibc2) + graft_eps)
            acc += sumsq(was, 0, hi - lo)
        elif graft == GRAFT_SGD:
            acc += sumsq(gs, 0, hi - lo)
        if graft == GRAFT_MOMENTUM or adam_fallback:
            hds, mhs = hd[lo:hi], mh[lo:hi]
            for i in range(hi - lo):
                hds[i] = hs[i] * ibc2
                mhs[i] = ms[i] * ibc1
            if graft == GRAFT_MOMENTUM:
                acc += sumsq(mhs, 0, hi - lo)
        rmax = max_nonneg(hs, hi - lo, rmax)
    if graft == GRAFT_RMSPROP_NORMALIZED:
        target = _rmsprop_normalized_target(gb, nub, k, b2, omb2, graft_eps, wa)
    else:
        target = np.sqrt(acc)
    eps_eff = _eps_effective(rmax * ibc2, eps, eps_min, relative)
    unorm2 = 0.0
    for lo in range(0, k, TILE):
        hi = min(lo + TILE, k)
        us, ms, hs = ub[lo:hi], mb[lo:hi], hb[lo:hi]
        for i in range(hi - lo):
            us[i] = (ms[i] * ibc1) / (hs[i] * ibc2 + eps_eff)
        unorm2 += sumsq(us, 0, hi - lo)
    _write_block(pb, ub, mh, hd, k, target, unorm2, graft, adam_fallback, graft_eps, neg_lr, wd)
    return 0


@njit(**SERIAL)
def tri_block(pb, gb, mb, bb, nub, k, S, omb1, b2, omb2, bc1, bc2, graft_eps, graft, eps, eps_min, relative,
              tau, neg_lr, wd, adam_fallback):
    """One block of tridiagonal SONew (edge removal, (S7)); returns the number of dropped edges.

    ``bb``: the block's band flattened (``bb[2i] = d_i``, ``bb[2i+1] = e_i``). Scratch rows of ``S``:
    ``Ĥ_ii``, ``Ĥ_i,i+1``, ``m̂``, ``ψ``, row sums (then 1 where an edge drops), ``t``, ``u``. With
    ``H = Ĥ + ε_eff I``: ``ψ_i = Ĥ_i,i+1/H_i+1,i+1``, ``s_i = H_ii - Ĥ_i,i+1 ψ_i`` (kept if
    ``s_i > τ H_ii``, else ``ψ_i = 0``, ``s_i = H_ii``), ``t_i = (m̂_i - ψ_i m̂_i+1)/s_i``,
    ``u_i = t_i - ψ_i-1 t_i-1``. Both sweeps run in L1 tiles of ``TILE`` rows.
    """
    hd, he, mh, psi, sv, t, ub = S[0], S[1], S[2], S[3], S[4], S[5], S[6]
    zero = bc2 - bc2
    one = bc2 / bc2
    kt = k - 1
    acc = 0.0
    rmax = zero
    for lo in range(0, k, TILE):
        hi = min(lo + TILE, k)
        h2 = min(hi, kt)  # rows with a right neighbour in the block
        gs, ms, bs_ = gb[lo:], mb[lo:], bb[2 * lo:]
        for x in range(h2 - lo):
            gj = gs[x]
            ms[x] = ms[x] + omb1 * (gj - ms[x])
            bs_[2 * x] = bs_[2 * x] * b2 + omb2 * (gj * gj)
            bs_[2 * x + 1] = bs_[2 * x + 1] * b2 + omb2 * (gj * gs[x + 1])
        if hi == k:  # the block's last row: no right neighbour in the block
            gj = gb[kt]
            mb[kt] = mb[kt] + omb1 * (gj - mb[kt])
            bb[2 * kt] = bb[2 * kt] * b2 + omb2 * (gj * gj)
            bb[2 * kt + 1] = bb[2 * kt + 1] * b2
        hds, hes, mhs, rows = hd[lo:hi], he[lo:hi], mh[lo:hi], sv[lo:hi]
        for x in range(hi - lo):
            hds[x] = bs_[2 * x] / bc2
            hes[x] = bs_[2 * x + 1] / bc2
        for x in range(hi - lo):
            mhs[x] = ms[x] / bc1
        acc += _graft_partial(gb, mh, hd, lo, hi, graft_eps, graft, ub)
        rows[0] = hds[0] + abs(hes[0]) + (abs(he[lo - 1]) if lo > 0 else zero)
        for x in range(1, hi - lo):  # row sums: diagonal, upper, lower
            rows[x] = hds[x] + abs(hes[x]) + abs(hes[x - 1])
        rmax = max_nonneg(rows, hi - lo, rmax)
    if graft == GRAFT_RMSPROP_NORMALIZED:
        target = _rmsprop_normalized_target(gb, nub, k, b2, omb2, graft_eps, ub)
    else:
        target = np.sqrt(acc)
    if adam_fallback:  # small tensors: the Adam direction replaces the update (the factor still counts)
        _write_block(pb, ub, mh, hd, k, target, 0.0, graft, True, graft_eps, neg_lr, wd)
    eps_eff = _eps_effective(rmax, eps, eps_min, relative)
    removed = 0
    unorm2 = 0.0
    for lo in range(0, k, TILE):
        hi = min(lo + TILE, k)
        h2 = min(hi, kt)
        hds, hes, ps, ts, mhs, drop = hd[lo:], he[lo:], psi[lo:], t[lo:], mh[lo:], sv[lo:]
        for x in range(h2 - lo):  # float32 only (an int64 count here would halve the SIMD width)
            e = hes[x]
            d0 = hds[x] + eps_eff
            w = e / (hds[x + 1] + eps_eff)
            s = d0 - e * w
            keep = s > tau * d0
            drop[x] = zero if keep else one
            w = w if keep else zero
            ps[x] = w
            ts[x] = (mhs[x] - w * mhs[x + 1]) / (s if keep else d0)
        removed += int(sum_prefix(drop, h2 - lo))
        if hi == k:
            psi[kt] = zero
            t[kt] = mh[kt] / (hd[kt] + eps_eff)
        us = ub[lo:hi]
        us[0] = ts[0] - (psi[lo - 1] * t[lo - 1] if lo > 0 else zero)
        for x in range(1, hi - lo):
            us[x] = ts[x] - ps[x - 1] * ts[x - 1]
        unorm2 += sumsq(us, 0, hi - lo)
    if not adam_fallback:
        _write_block(pb, ub, mh, hd, k, target, unorm2 if graft != GRAFT_NONE else 0.0, graft, False, graft_eps,
                     neg_lr, wd)
    return removed


# ------------------------------------------------ drivers: blocks in parallel, scratch once per thread


@njit(**OPTS)
def blocks_step_diag(p, g, m, h, nu, bsz, nthreads, omb1, b2, omb2, ibc1, ibc2, graft_eps, graft, eps, eps_min,
                     relative, tau, neg_lr, wd, adam_fallback, removed_out):
    """Every block of ``bsz`` entries (:func:`diag_block`); thread ``w`` runs a contiguous run of blocks."""
    n = p.size
    nblocks = removed_out.size
    for w in prange(nthreads):
        S = np.empty((4, bsz), dtype=p.dtype)
        for c in range(w * nblocks // nthreads, (w + 1) * nblocks // nthreads):
            lo = c * bsz
            hi = min(lo + bsz, n)
            removed_out[c] = diag_block(p[lo:hi], g[lo:hi], m[lo:hi], h[lo:hi], nu[lo:hi] if nu.size == n else nu,
                                        hi - lo, S, omb1, b2, omb2, ibc1, ibc2, graft_eps, graft, eps, eps_min,
                                        relative, neg_lr, wd, adam_fallback)


@njit(**OPTS)
def blocks_step_tri(p, g, m, bf, nu, bsz, nthreads, omb1, b2, omb2, bc1, bc2, graft_eps, graft, eps, eps_min,
                    relative, tau, neg_lr, wd, adam_fallback, removed_out):
    """Every block of ``bsz`` entries (:func:`tri_block`); thread ``w`` runs a contiguous run of blocks."""
    n = p.size
    nblocks = removed_out.size
    for w in prange(nthreads):
        S = np.empty((7, bsz), dtype=p.dtype)
        for c in range(w * nblocks // nthreads, (w + 1) * nblocks // nthreads):
            lo = c * bsz
            hi = min(lo + bsz, n)
            removed_out[c] = tri_block(p[lo:hi], g[lo:hi], m[lo:hi], bf[2 * lo:2 * hi],
                                       nu[lo:hi] if nu.size == n else nu, hi - lo, S, omb1, b2, omb2, bc1, bc2,
                                       graft_eps, graft, eps, eps_min, relative, tau, neg_lr, wd, adam_fallback)
