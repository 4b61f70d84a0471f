#!/usr/bin/env python
"""One warm-started QR refresh of a Shampoo factor, in units of one GEMM of the same size.

A 1024² float32 factor one EMA step (b2 = 0.95) after the basis was exact: the refresh of
``arrayopt.shampoo.eigenbasis.refresh_eigenbasis`` (``F·Q``, skip test, one or two Cholesky QR
passes), against SOAP's refresh (``F·Q`` and one Householder QR; NumPy's and, when installed,
torch's), all timed interleaved in one process (median of ``--reps``).

Usage: OPENBLAS_NUM_THREADS=1 python asv_bench/scripts/eigenbasis_refresh.py [--n 1024] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from arrayopt.shampoo import eigenbasis  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    n = args.n
    rng = np.random.default_rng(0)
    gs = [rng.standard_normal((n, n), dtype=np.float32) for _ in range(11)]
    a0 = sum(g @ g.T for g in gs[:10]) / np.float32(10)
    w, v = np.linalg.eigh(a0.astype(np.float64))
    q = np.ascontiguousarray(v[:, ::-1]).astype(np.float32)
    a = np.float32(0.95) * a0 + np.float32(0.05) * (gs[10] @ gs[10].T)
    cases = {"GEMM F·Q": lambda: a @ q,
             "arrayopt refresh": lambda: eigenbasis.refresh_eigenbasis(a, q, method="qr", compute_dtype="float32",
                                                                       eigenvalues=False),
             "F·Q + NumPy Householder QR": lambda: np.linalg.qr(a @ q)}
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OPENBLAS_NUM_THREADS", os.cpu_count())))
        at, qt = torch.from_numpy(a), torch.from_numpy(q)
        cases["F·Q + torch Householder QR (SOAP)"] = lambda: torch.linalg.qr(at @ qt)
    except ImportError:
        print("  skip torch (not installed)")
    times = {k: [] for k in cases}
    for _ in range(args.reps):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    gemm = float(np.median(times["GEMM F·Q"]))
    for k, ts in times.items():
        ms = float(np.median(ts))
        print(f"{n}x{n} float32  {k:36s} {ms * 1e3:8.1f} ms  {ms / gemm:5.1f} GEMMs")
    r = eigenbasis.refresh_eigenbasis(a, q, method="qr", compute_dtype="float32", eigenvalues=False)
    b = r.basis.astype(np.float64)
    print(f"status {r.status}; ‖QᵀQ − I‖_F = {np.linalg.norm(b.T @ b - np.eye(n)):.2e} (n·u = {n * 2.0 ** -23:.2e})")


if __name__ == "__main__":
    main()
