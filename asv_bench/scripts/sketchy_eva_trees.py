#!/usr/bin/env python
"""Sketchy and Eva-s on real-model parameter trees, against torch fused Adam in the same run.

Trees (torch CPU float32 tensors, the shapes of the models' ``named_parameters()``):

  resnet18  62 leaves, 11.7M params: conv1 64x3x7x7, bn1, 4 stages x 2 BasicBlocks of 3x3 convs
            with bn after each conv, a 1x1 downsample conv + bn in the first block of stages 2-4,
            fc 1000x512 + 1000
  gpt2      148 leaves, 124M params: wte 50257x768, wpe 1024x768, 12 blocks (ln_1, c_attn 768x2304,
            attn c_proj 768x768, ln_2, c_fc 768x3072, mlp c_proj 3072x768, with biases), ln_f
  tiny N    N 1-D leaves of 4 and 8 entries in turn (the fixed cost per leaf: the slope of
            the step time over N)

Contenders: ``ao.sketchy()`` and ``ao.eva(variant="eva_s")`` ``step()``, ``torch.optim.Adam(fused=True)``
and, where ``pytorch_optimizer`` is installed, its ``Shampoo`` with ``preconditioning_compute_steps=1``
(ResNet-18 only: GPT-2's 50257-row embedding would need a 10 GB preconditioner). Each contender
takes ``--warmup`` steps, then the median of ``--reps`` timed steps; ratios are to torch fused Adam
(and Shampoo) measured in the same process.

Usage: PYTHONPATH=. python asv_bench/scripts/sketchy_eva_trees.py [--trees resnet18,gpt2,tiny]
       [--threads 2] [--reps 5] [--warmup 2] [--only sketchy,eva_s]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from arrayopt.gpu_check.trees import gpt2_shapes, resnet18_shapes  # noqa: E402


def tiny_shapes(n: int) -> dict:
    return {f"p{i}": ((4, 8)[i % 2],) for i in range(n)}


def make_tree(shapes: dict, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()} for _ in range(2)]
    return params, grads


def time_ao(opt, shapes, warmup, reps):
    import torch

    params, grads = make_tree(shapes)
    state = opt.init(params)
    times = []
    with torch.no_grad():
        for i in range(warmup + reps):
            t0 = time.perf_counter()
            params, state = opt.step(params, grads[i % 2], state)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_torch(make, shapes, warmup, reps):
    import torch

    params, grads = make_tree(shapes)
    ps = [torch.nn.Parameter(v) for v in params.values()]
    opt = make(ps)
    times = []
    for i in range(warmup + reps):
        for p, g in zip(ps, grads[i % 2].values()):
            p.grad = g
        t0 = time.perf_counter()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peer_shampoo():
    try:
        from pytorch_optimizer import Shampoo
    except ImportError:
        return None
    return lambda ps: Shampoo(ps, lr=1e-3, momentum=0.9, preconditioning_compute_steps=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", default="resnet18,gpt2,tiny")
    ap.add_argument("--only", default="sketchy,eva_s")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tiny", default="64,256,1024", help="leaf counts of the tiny trees")
    args = ap.parse_args()
    import torch

    import arrayopt as ao

    torch.set_num_threads(args.threads)
    ours = {"sketchy": lambda: ao.sketchy(), "eva_s": lambda: ao.eva(learning_rate=1e-3, variant="eva_s")}
    only = [k for k in args.only.split(",") if k]
    adam = lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)  # noqa: E731
    for tree in args.trees.split(","):
        if tree == "tiny":
            counts = [int(n) for n in args.tiny.split(",")]
            for name in only + ["adam"]:
                ts = []
                for n in counts:
                    shapes = tiny_shapes(n)
                    t = time_torch(adam, shapes, args.warmup, args.reps) if name == "adam" else \
                        time_ao(ours[name](), shapes, args.warmup, args.reps)
                    ts.append(t)
                slope = (ts[-1] - ts[0]) / (counts[-1] - counts[0])
                cells = ", ".join(f"{n}: {t * 1e3:.2f} ms" for n, t in zip(counts, ts))
                print(f"tiny {name:8s} {cells}; per leaf {slope * 1e6:.1f} us", flush=True)
            continue
        shapes = {"resnet18": resnet18_shapes, "gpt2": gpt2_shapes}[tree]()
        n_params = sum(int(torch.Size(s).numel()) for s in shapes.values())
        t_adam = time_torch(adam, shapes, args.warmup, args.reps)
        line = f"{tree} ({len(shapes)} leaves, {n_params / 1e6:.1f}M): torch fused Adam {t_adam * 1e3:.1f} ms"
        t_sh = None
        if tree == "resnet18" and peer_shampoo() is not None:
            t_sh = time_torch(peer_shampoo(), shapes, 1, max(2, args.reps // 2))
            line += f"; pytorch_optimizer.Shampoo F=1 {t_sh * 1e3:.0f} ms"
        print(line, flush=True)
        for name in only:
            t = time_ao(ours[name](), shapes, args.warmup, args.reps)
            extra = f", {t / t_sh:.2f}x Shampoo" if t_sh else ""
            print(f"  {name:8s} {t * 1e3:9.1f} ms  {t / t_adam:6.1f}x fused Adam{extra}", flush=True)


if __name__ == "__main__":
    main()
