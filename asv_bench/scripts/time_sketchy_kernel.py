"""Sketchy step time, reference step vs the fused Numba step, interleaved (medians).

    PYTHONPATH=. python asv_bench/scripts/time_sketchy_kernel.py --size 1024 --rank 128 --reps 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import arrayopt as ao
from arrayopt import dispatch


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--update-every", type=int, default=10)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.size, args.size)
    grads = [{"w": rng.standard_normal(shape).astype(args.dtype)} for _ in range(4)]
    opt = ao.sketchy(learning_rate=1e-3, rank=args.rank, update_every=args.update_every)
    runs = {}
    for backend in ("reference", "numba_cpu"):
        params = {"w": rng.standard_normal(shape).astype(args.dtype)}
        runs[backend] = [params, opt.init(params)]
        with dispatch.use_backend(backend):  # warm-up: compile, first sketch
            runs[backend][0], runs[backend][1] = opt.step(*runs[backend][0:1], grads[0], runs[backend][1])
    times = {b: [] for b in runs}
    for r in range(args.reps * args.update_every):
        for backend in runs:  # interleaved
            p, s = runs[backend]
            with dispatch.use_backend(backend):
                t0 = time.perf_counter()
                p, s = opt.step(p, grads[r % 4], s)
                times[backend].append(time.perf_counter() - t0)
            runs[backend] = [p, s]
    ref = statistics.median(times["reference"])
    for backend, ts in times.items():
        med = statistics.median(ts)
        print(f"{backend:10s} {args.size}x{args.size} rank {args.rank} update_every {args.update_every} "
              f"{args.dtype}: median {med * 1e3:.2f} ms/step (x{ref / med:.2f} vs reference)")


if __name__ == "__main__":
    main()
