#!/usr/bin/env python
"""Where a tridiagonal SONew block's time goes: its loops timed one by one, in cache, on one thread.

Each loop of ``tri_block`` (``backends/numba_cpu/sonew/block_kernels.py``) is copied here with its
arithmetic and array shapes, run over one block of ``B = 16384`` float32 entries held in L2,
``--reps`` times, and reported in ns per entry; next to them the fused ``tri_block`` and
``diag_block`` themselves, our Adam kernel on the same cached block, and our Adam step
(``ao.adam().step``, finiteness check included) and the block-local steps at ``--n``
entries on every thread, which stream from memory. The question it answers: how much of a
block-local step is arithmetic on cached data, against what our Adam step costs per entry
when it streams from memory. With ``T`` threads a step over ``n`` entries cannot take less
than ``n/T`` times the in-cache cost of its block, however its memory traffic overlaps.

Usage: python asv_bench/scripts/sonew_block_pieces.py [--reps 400] [--n 1e7]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import arrayopt as ao  # noqa: E402
from numba import get_num_threads, njit, set_num_threads  # noqa: E402

from arrayopt.backends.numba_cpu._common import max_nonneg, sum_prefix, sumsq  # noqa: E402
from arrayopt.backends.numba_cpu.first_order import kernel_for  # noqa: E402
from arrayopt.backends.numba_cpu.sonew.block_kernels import TILE, diag_block, tri_block  # noqa: E402
from arrayopt.backends.numba_cpu.sonew.blocks import run_blocks  # noqa: E402

K = 16384
F32 = np.float32
OMB1, B2, OMB2, BC1, BC2 = F32(0.1), F32(0.999), F32(0.001), F32(0.3), F32(0.02)
GEPS, EPS, TAU = F32(1e-8), F32(1e-6), F32(1e-6)
_S = dict(boundscheck=False, error_model="numpy", nogil=True)


@njit(**_S)
def stats(g, m, bb, reps):
    """``m``, ``d_i``, ``e_i`` in place (the band interleaved ``(n, 2)``, as the state stores it)."""
    for _ in range(reps):
        for lo in range(0, K, TILE):
            gs, ms, bs_ = g[lo:], m[lo:], bb[2 * lo:]
            for x in range(min(TILE, K - 1 - lo)):
                gj = gs[x]
                ms[x] = ms[x] + OMB1 * (gj - ms[x])
                bs_[2 * x] = bs_[2 * x] * B2 + OMB2 * (gj * gj)
                bs_[2 * x + 1] = bs_[2 * x + 1] * B2 + OMB2 * (gj * gs[x + 1])


@njit(**_S)
def bias_corrected(bb, m, hd, he, mh, reps):
    """``Ĥ_ii = d_i/bc2``, ``Ĥ_i,i+1 = e_i/bc2``, ``m̂ = m/bc1`` (three divisions per entry)."""
    for _ in range(reps):
        for lo in range(0, K, TILE):
            bs_, hds, hes, ms, mhs = bb[2 * lo:], hd[lo:], he[lo:], m[lo:], mh[lo:]
            for x in range(TILE):
                hds[x] = bs_[2 * x] / BC2
                hes[x] = bs_[2 * x + 1] / BC2
            for x in range(TILE):
                mhs[x] = ms[x] / BC1


@njit(**_S)
def adam_graft(mh, hd, wa, reps):
    """``Σ a_i²``, ``a = m̂/(√Ĥ_ii + ε_g)`` per tile."""
    acc = 0.0
    for _ in range(reps):
        for lo in range(0, K, TILE):
            a, b, o = mh[lo:lo + TILE], hd[lo:lo + TILE], wa[lo:lo + TILE]
            for i in range(TILE):
                o[i] = a[i] / (np.sqrt(b[i]) + GEPS)
            acc += sumsq(o, 0, TILE)
    return acc


@njit(**_S)
def row_sums_max(hd, he, rows, reps):
    """``max_i Ĥ_ii + |Ĥ_i,i+1| + |Ĥ_i-1,i|`` (the relative ε)."""
    rmax = F32(0)
    for _ in range(reps):
        for lo in range(0, K, TILE):
            hds, hes, rw = hd[lo:], he[lo:], rows[lo:]
            rw[0] = hds[0] + abs(hes[0])
            for x in range(1, TILE):
                rw[x] = hds[x] + abs(hes[x]) + abs(hes[x - 1])
            rmax = max_nonneg(rw, TILE, rmax)
    return rmax


@njit(**_S)
def factor(hd, he, mh, ps, ts, drop, reps):
    """``ψ_i``, ``s_i`` with edge removal, ``t_i = (m̂_i - ψ_i m̂_i+1)/s_i`` (two divisions per entry)."""
    zero, one = F32(0), F32(1)
    removed = 0
    for _ in range(reps):
        for lo in range(0, K, TILE):
            hds, hes, pss, tss, mhs, dr = hd[lo:], he[lo:], ps[lo:], ts[lo:], mh[lo:], drop[lo:]
            k = min(TILE, K - 1 - lo)
            for x in range(k):
                e = hes[x]
                d0 = hds[x] + EPS
                w = e / (hds[x + 1] + EPS)
                s = d0 - e * w
                keep = s > TAU * d0
                dr[x] = zero if keep else one
                w = w if keep else zero
                pss[x] = w
                tss[x] = (mhs[x] - w * mhs[x + 1]) / (s if keep else d0)
            removed += int(sum_prefix(dr, k))
    return removed


@njit(**_S)
def l_apply(ps, ts, us, reps):
    """``u_i = t_i - ψ_i-1 t_i-1`` and ``‖u‖²``."""
    acc = 0.0
    for _ in range(reps):
        for lo in range(0, K, TILE):
            pss, tss, uss = ps[lo:], ts[lo:], us[lo:lo + TILE]
            uss[0] = tss[0]
            for x in range(1, TILE):
                uss[x] = tss[x] - pss[x - 1] * tss[x - 1]
            acc += sumsq(uss, 0, TILE)
    return acc


@njit(**_S)
def write(p, us, reps):
    """``p ← p - η c u``."""
    scale, neg_lr = F32(0.5), F32(-1e-3)
    for _ in range(reps):
        for i in range(K):
            p[i] = p[i] + neg_lr * (us[i] * scale)


@njit(**_S)
def tri_blocks(p, g, m, bb, scratch, reps):
    r = 0
    for _ in range(reps):
        r += tri_block(p, g, m, bb, m, K, scratch, OMB1, B2, OMB2, BC1, BC2, GEPS, 1, EPS, F32(1e-30), True, TAU,
                       F32(-1e-3), F32(0), False)
    return r


@njit(**_S)
def diag_blocks(p, g, m, h, scratch, reps):
    for _ in range(reps):
        diag_block(p, g, m, h, m, K, scratch, OMB1, B2, OMB2, F32(1) / BC1, F32(1) / BC2, GEPS, 1, EPS, F32(1e-30),
                   True, F32(-1e-3), F32(0), False)


def _adam_kernel(p, g, m, v, reps):
    """Our Adam kernel (its serial build, the one small leaves run) on the cached block."""
    adam = kernel_for("adam", 2, size=1)  # a small leaf: the serial build
    for _ in range(reps):
        adam(p, g, m, v, F32(1e-3), OMB1, B2, OMB2, F32(0.8), GEPS, F32(0), F32(1))


def _driver_ns(band, n, reps=50):
    """``run_blocks`` (what ``opt.step`` calls on NumPy arrays) on ``n`` cached entries, warmed up."""
    rng = np.random.default_rng(band)
    opt = ao.sonew(1e-3, band=band)
    p = rng.standard_normal(n).astype(F32)
    g = (rng.standard_normal(n) * 1e-2).astype(F32)
    st = opt.init(p)
    for _ in range(3):
        p, st = opt.step(p, g, st)
    step = opt.step_description(3)
    m, bands = st["mu"][0], st["band"][0]
    return _best_ns(lambda r: [run_blocks(step, p, g, m, bands, None, K, False) for _ in range(r)], reps, n)


def _best_ns(fn, reps, entries, tries=5):
    fn(1)
    best = np.inf
    for _ in range(tries):
        t0 = time.perf_counter()
        fn(reps)
        best = min(best, time.perf_counter() - t0)
    return best / (reps * entries) * 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--n", type=float, default=1e7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vec = lambda scale=1.0: (rng.standard_normal(K) * scale).astype(F32)  # noqa: E731
    g, m, p, mh, he = vec(1e-2), vec(1e-3), vec(), vec(), vec(0.1)
    bb = np.abs(rng.standard_normal(2 * K)).astype(F32)
    h, hd = np.abs(vec()) + 1, np.abs(vec()) + 1
    wa, ps, ts, drop, us = (np.zeros(K, F32) for _ in range(5))
    scratch = np.zeros((7, K), F32)
    pieces = {
        "statistics (m, d, e)": lambda r: stats(g, m, bb, r),
        "bias corrections (3 divisions)": lambda r: bias_corrected(bb, m, hd, he, mh, r),
        "Adam graft norm (sqrt, division)": lambda r: adam_graft(mh, hd, wa, r),
        "row sums and their max": lambda r: row_sums_max(hd, he, drop, r),
        "factor and t (2 divisions)": lambda r: factor(hd, he, mh, ps, ts, drop, r),
        "u = L t and its norm": lambda r: l_apply(ps, ts, us, r),
        "parameter write": lambda r: write(p, us, r),
    }
    out = {k: _best_ns(f, args.reps, K) for k, f in pieces.items()}
    whole = {
        "tri_block (the fused kernel)": lambda r: tri_blocks(p, g, m, bb, scratch, r),
        "diag_block (the fused kernel)": lambda r: diag_blocks(p, g, m, h, scratch, r),
        "Adam kernel": lambda r: _adam_kernel(p, g, m, np.abs(vec()), r),
    }
    for k, f in whole.items():
        out[k] = _best_ns(f, args.reps, K)
    print(f"in cache, one thread, one block of {K} float32 entries (ns per entry):")
    for k, v in out.items():
        print(f"  {k:34s} {v:6.3f}")
    print(f"  {'sum of the tridiagonal loops':34s} {sum(out[k] for k in pieces):6.3f}")
    print("\nin cache, one thread, the block driver on 2 blocks (its Python call included; ns per entry):")
    threads = get_num_threads()
    set_num_threads(1)
    try:
        for band in (0, 1, 4):
            print(f"  {'band ' + str(band):34s} {_driver_ns(band, 2 * K):6.3f}")
    finally:
        set_num_threads(threads)
    n = int(args.n)
    steps = {"adam": ao.adam(1e-3), "diag": ao.sonew(1e-3, band=0), "tridiag": ao.sonew(1e-3, band=1)}
    print(f"\nfrom memory, {n} entries, {threads} threads (ns per entry per thread; ao.<opt>().step):")
    for name, opt in steps.items():
        pn = rng.standard_normal(n).astype(F32)
        gn = (rng.standard_normal(n) * 1e-2).astype(F32)
        st = opt.init(pn)
        for _ in range(2):
            pn, st = opt.step(pn, gn, st)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            pn, st = opt.step(pn, gn, st)
            times.append(time.perf_counter() - t0)
        print(f"  {name:34s} {np.median(times) / n * threads * 1e9:6.3f}")
        del pn, gn, st


if __name__ == "__main__":
    main()
