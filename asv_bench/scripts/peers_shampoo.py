#!/usr/bin/env python
"""arrayopt Shampoo side by side with peer Shampoo-family optimizers, in ONE process, interleaved.

Contenders per layer shape (one float32 weight, a rotating set of 4 precomputed gradients):

  ao-f64 / ao-f32   arrayopt Shampoo, roots by host eigh in float64 / float32, every F steps
  ao-async          same (float64 roots) with a 1-thread executor, root_delay=F (roots run on the host
                    thread while the next F-1 steps proceed)
  ao-qr             root-inverse roots from eigenbases refreshed by one warm-started QR iteration (float32)
  ao-ec-qr          eigenvalue-corrected (SOAP-style) Shampoo, QR-refreshed float32 bases, b1 0.9, b2 0.95
                    (heavyball SOAP's defaults: Adam-style moment in the eigenbasis)
  ao-ec-qr-1side    the same, one-sided as heavyball's SOAP is on a dim above 2048 (that dim rotated
                    by the identity), unblocked: exactly SOAP's preconditioning work (4096x1024 only)
  po                pytorch_optimizer.Shampoo (SVD roots) every F steps   [skipped if not installed]
  hb-soap           heavyball.SOAP, precondition_frequency=F, eager        [skipped if not installed]
  adam              torch.optim.Adam(fused=True): the denominator of 'x adam'

Same statistics and root settings as pytorch_optimizer.Shampoo: running sum of GGᵀ/GᵀG
(b2 = 1), ε = 1e-6, exponent -1/4 per factor, no momentum, no grafting, no blocking at 1024²
(block size 1024 for 4096x1024, where arrayopt uses 4 blocks of 1024²; the peers precondition the
whole 4096x1024 matrix). F=1: median ms/step; F>1: amortized mean over whole cycles of F steps.

Usage: python asv_bench/scripts/peers_shampoo.py [--shapes 1024x1024,4096x1024] [--freq 10] [--rounds 2]
On a machine shared with other jobs, one thread per library gives steadier ratios:
OPENBLAS_NUM_THREADS=1 python asv_bench/scripts/peers_shampoo.py --threads 1 ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import arrayopt as ao  # noqa: E402

LR = 1e-3


def grads_for(shape, k=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-2) for _ in range(k)]


class AO:
    def __init__(self, shape, freq, root_dtype="float64", executor=None, block_size=1024, **kw):
        kw = {"b1": 0.0, "b2": 1.0, "eps": 1e-6, **kw}
        self.opt = ao.shampoo(learning_rate=LR, block_size=block_size, graft="none",
                              precondition_every=freq, root_dtype=root_dtype, executor=executor,
                              root_delay=(freq if executor is not None else None), **kw)
        self.p = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
        self.gs = grads_for(shape)
        self.s = self.opt.init(self.p)
        self.i = 0

    def step(self):
        self.p, self.s = self.opt.step(self.p, self.gs[self.i % 4], self.s)
        self.i += 1


class Torch:
    def __init__(self, shape, make):
        import torch
        self.p = torch.nn.Parameter(torch.from_numpy(np.random.default_rng(1).standard_normal(shape, dtype=np.float32)))
        self.gs = [torch.from_numpy(g) for g in grads_for(shape)]
        self.opt = make([self.p])
        self.i = 0

    def step(self):
        self.p.grad = self.gs[self.i % 4]
        self.i += 1
        self.opt.step()


def contenders(shape, F, pool):
    import torch
    bs = 1024
    out = [("adam torch fused", 1, lambda: Torch(shape, lambda ps: torch.optim.Adam(ps, lr=LR, fused=True)))]
    for fq in (1, F):
        out.append((f"ao-f64 F={fq}", fq, lambda fq=fq: AO(shape, fq, "float64", block_size=bs)))
        out.append((f"ao-f32 F={fq}", fq, lambda fq=fq: AO(shape, fq, "float32", block_size=bs)))
        out.append((f"ao-qr F={fq}", fq, lambda fq=fq: AO(shape, fq, "float32", block_size=bs, root_method="qr")))
        out.append((f"ao-ec-qr F={fq}", fq, lambda fq=fq: AO(
            shape, fq, "float32", block_size=bs, root_method="qr", preconditioner="eigenvalue_corrected",
            b1=0.9, b2=0.95, eps=1e-8)))
        if max(shape) > 2048:  # heavyball SOAP leaves dims > max_precond_dim (2048) unpreconditioned
            out.append((f"ao-ec-qr-1side F={fq}", fq, lambda fq=fq: AO(
                shape, fq, "float32", block_size=max(shape), root_method="qr", preconditioner="eigenvalue_corrected",
                preconditioner_type="output" if shape[-1] <= 2048 else "input", b1=0.9, b2=0.95, eps=1e-8)))
        try:
            import pytorch_optimizer as po
            out.append((f"po Shampoo(svd) F={fq}", fq, lambda fq=fq: Torch(
                shape, lambda ps: po.Shampoo(ps, lr=LR, preconditioning_compute_steps=fq, matrix_eps=1e-6))))
        except ImportError:
            print("  skip pytorch_optimizer (not installed)")
        try:
            import heavyball
            import heavyball.utils as hbu
            hbu.compile_mode = None

            def mk(ps, fq=fq):
                return heavyball.SOAP(ps, lr=LR, precondition_frequency=fq)
            out.append((f"hb-soap SOAP eager F={fq}", fq, lambda mk=mk: Torch(shape, mk)))
        except ImportError:
            print("  skip heavyball (not installed)")
    out.append((f"ao-async-f64 F={F}", F, lambda: AO(shape, F, "float64", executor=pool, block_size=bs)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1024x1024,4096x1024")
    ap.add_argument("--freq", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps1", type=int, default=2)
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: all cores); set OPENBLAS_NUM_THREADS to the same for NumPy")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads or os.cpu_count())
    F = args.freq
    pool = ThreadPoolExecutor(1)
    results = {}
    for shp in args.shapes.split(","):
        shape = tuple(int(x) for x in shp.split("x"))
        cfgs = contenders(shape, F, pool)
        if args.only:
            keep = tuple(args.only.split(","))
            cfgs = [c for c in cfgs if c[0].startswith(keep) or c[0].startswith("adam")]
        live, times = [], {}
        for name, fq, mk in cfgs:
            try:
                o = mk()
                for _ in range(2 if fq == 1 else fq + 1):
                    o.step()
                live.append((name, fq, o))
                times[name] = []
                print(f"  ready {name}", flush=True)
            except Exception as e:  # a peer that fails is reported, not fatal
                print(f"  FAILED {name}: {e!r}"[:300], flush=True)
        spent = {n: 0.0 for n, _, _ in live}
        for r in range(args.rounds):
            order = live[r % len(live):] + live[:r % len(live)]
            for name, fq, o in order:
                if spent[name] > args.budget:
                    continue
                for _ in range(args.steps1 if fq == 1 else fq):
                    t0 = time.perf_counter()
                    o.step()
                    dt = time.perf_counter() - t0
                    times[name].append(dt)
                    spent[name] += dt
                if isinstance(o, AO) and o.opt.executor is not None:
                    # untimed: a root job still running in the background would slow the next contender
                    o.s.settle()
        adam = statistics.median(times["adam torch fused"]) * 1e3
        rows = {}
        for name, fq, o in live:
            ts = [t * 1e3 for t in times[name]]
            if fq == 1:
                ms = statistics.median(ts)
                extra = ""
            else:
                cycles = [sum(ts[i:i + fq]) / fq for i in range(0, len(ts) - fq + 1, fq)]
                ms = statistics.mean(cycles)
                extra = f"  median step {statistics.median(ts):.1f}  max step {max(ts):.1f}"
            nbytes = ao.state_nbytes(o.s) if isinstance(o, AO) else None
            rows[name] = {"ms": ms, "x_adam": ms / adam, "state_bytes": nbytes, "n": len(ts)}
            print(f"{shp:10s} {name:28s} {ms:9.1f} ms  x{ms / adam:7.1f} adam{extra}"
                  + (f"  state {nbytes / 2**20:.1f} MiB" if nbytes else ""), flush=True)
        for fq in sorted({1, F}):
            peers = [v["ms"] for k, v in rows.items() if k.endswith(f"F={fq}") and k.startswith(("po", "hb"))]
            ours = {k: v["ms"] for k, v in rows.items() if k.endswith(f"F={fq}") and k.startswith("ao")}
            if peers:
                best = min(peers)
                print(f"{shp} F={fq}: best peer {best:.1f} ms; "
                      + ", ".join(f"{k} {v / best:.2f}x" for k, v in ours.items()))
        results[shp] = rows
    pool.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
