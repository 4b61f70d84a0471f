#!/usr/bin/env python
"""The host linear algebra behind Shampoo's roots and Sketchy's FD update on torch leaves
(``arrayopt/linalg/host_lapack.py``), and the finiteness test: NumPy against torch, in one process.

1. ``eigh`` of stacks of symmetric matrices, float64 and float32, NumPy and torch (best of 3).
2. Two thread pools on the same cores: a torch product alone, and alternated with a NumPy
   (OpenBLAS) ``eigh`` or with torch's ``eigh`` of the same matrix.
3. Sketchy's top ``k + 1`` left singular pairs of ``Z`` (float32): QR of ``Zᵀ`` + SVD of ``R`` against
   the Gram route with a batched full ``eigh`` (what torch takes since this change).
4. ``all_finite`` of ResNet-18's gradients (torch): ``isfinite(g).all()`` per leaf against the sums.

    python asv_bench/scripts/host_linalg.py            # about a minute, 2 threads
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import env_info, set_threads  # noqa: E402


def best(fn, repeat=3):
    fn()
    out = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    print(env_info())
    rng = np.random.default_rng(0)

    print("\n| eigh, stack | NumPy float64 ms | torch float64 ms | NumPy float32 ms | torch float32 ms |")
    print("|---|---:|---:|---:|---:|")
    for n, b in [(512, 10), (1000, 1), (256, 10)]:
        x = rng.standard_normal((b, n, 2 * n))
        a = x @ x.transpose(0, 2, 1)
        row = []
        for dt in (np.float64, np.float32):
            aa = a.astype(dt)
            row += [best(lambda: np.linalg.eigh(aa)), best(lambda: torch.linalg.eigh(torch.from_numpy(aa)))]
        print(f"| {b} × {n}² | " + " | ".join(f"{v:.1f}" for v in (row[0], row[1], row[2], row[3])) + " |")

    z = torch.randn(512, 4736)
    g = z @ z.T
    gn = g.numpy()
    mm = best(lambda: z @ z.T, 5)
    alt_np = best(lambda: (z @ z.T, np.linalg.eigh(gn)), 5)
    alt_t = best(lambda: (z @ z.T, torch.linalg.eigh(g)), 5)
    print("\n| 512 × 4736 float32 | ms |")
    print("|---|---:|")
    print(f"| torch product `Z Zᵀ` alone | {mm:.1f} |")
    print(f"| product + NumPy `eigh` of 512² | {alt_np:.1f} |")
    print(f"| product + torch `eigh` of 512² | {alt_t:.1f} |")

    sketch = importlib.import_module("arrayopt.sketchy.math")
    import array_api_compat as compat

    xp = compat.array_namespace(torch.zeros(1))
    print("\n| Sketchy, top 129 pairs of Z (float32) | QR + SVD ms | Gram + batched eigh ms |")
    print("|---|---:|---:|")
    for shape in [(1, 512, 4736), (1, 768, 896), (1, 256, 2432)]:
        zz = torch.randn(shape)

        def qr_svd():
            _, r = torch.linalg.qr(zz.mT)
            return torch.linalg.svd(r.mT, full_matrices=False)

        print(f"| {shape[1]} × {shape[2]} | {best(qr_svd):.1f} | "
              f"{best(lambda: sketch._top_left_singular_stacked(xp, zz, 129)):.1f} |")

    from benchmarks.real_trees import SHAPES, TreeData
    from arrayopt import _validate

    grads = list(TreeData(SHAPES["resnet18"]()).grads[0].values())

    def isfinite_all():
        return bool(torch.all(torch.stack([torch.all(torch.isfinite(t)) for t in grads])))

    print("\n| finiteness of ResNet-18's gradients (torch, 62 leaves) | ms |")
    print("|---|---:|")
    print(f"| `isfinite(g).all()` per leaf | {best(isfinite_all, 5):.2f} |")
    print(f"| `arrayopt._validate.all_finite` (sums) | {best(lambda: _validate.all_finite(xp, grads), 5):.2f} |")


if __name__ == "__main__":
    main()
