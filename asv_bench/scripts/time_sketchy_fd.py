"""``fd_update`` of a float32 sketch (float32 Gram + Rayleigh–Ritz) vs the same data in float64
(the float64 Gram route, or QR + SVD for a tall ``[U, X]``), interleaved, medians.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python asv_bench/scripts/time_sketchy_fd.py --rank 128 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import arrayopt as ao


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="1024x1024,4096x1024,1024x4096", help="d x m: sketch dim x new columns")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    k = args.rank
    for d, m in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]:
        x = (rng.standard_normal((d, m)) * np.arange(1, d + 1)[:, None] ** -0.5).astype(np.float32)
        sketches = {}
        for dt in (np.float32, np.float64):  # a first update fills the sketch
            s = ao.linalg.fd_update(np.zeros((d, k), dt), np.zeros(k, dt), np.zeros(1, dt), x.astype(dt), beta2=0.999)
            sketches[dt] = (s.eigvecs, s.sv, s.tail, x.astype(dt))
        times = {dt: [] for dt in sketches}
        for _ in range(args.reps):
            for dt, (u, sv, tail, xd) in sketches.items():
                t0 = time.perf_counter()
                ao.linalg.fd_update(u, sv, tail, xd, beta2=0.999)
                times[dt].append(time.perf_counter() - t0)
        a, b = statistics.median(times[np.float32]), statistics.median(times[np.float64])
        print(f"fd_update d={d} m={m} k={k}: float32 {a * 1e3:.0f} ms, float64 {b * 1e3:.0f} ms, ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
