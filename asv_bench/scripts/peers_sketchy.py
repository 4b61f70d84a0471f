#!/usr/bin/env python
"""arrayopt Sketchy side by side with Google's tearfree Sketchy, in ONE process, interleaved.

Contenders per layer shape (one float32 weight, a rotating set of 4 precomputed gradients), both
returning the preconditioned direction only (no grafting, no momentum, learning rate 1):

  ao        ao.sketchy(rank=R, tail_decay="sqrt", update_every=F) update() on NumPy
  tearfree  precondition.tearfree.sketchy.apply(Options(rank=R, update_freq=F)), jitted, on JAX CPU

Same options: rank R (default 128), β₂ = 0.999 with tearfree's √β₂ tail decay, ε = 1e-7 relative,
exponent -1/4 per axis, no merging or blocking. F=1: median ms/step; F>1: mean over whole cycles of
F steps. Also: the cosine between the two directions at every step of a common run, and the
state bytes of each.

The peer is not a package. Get it with
    git clone https://github.com/google-research/precondition /tmp/precondition
    pip install optax chex absl-py   (jax as installed)
and pass --peer /tmp/precondition (default: $PRECONDITION_PATH, else /tmp/precondition); without
it only arrayopt runs.

On a busy machine run it with OPENBLAS_NUM_THREADS=1 (both contenders' LAPACK is OpenBLAS):
threaded OpenBLAS on oversubscribed cores makes the ratios scatter several-fold between runs.

Usage: python asv_bench/scripts/peers_sketchy.py [--shapes 1024x1024,4096x1024] [--freqs 1,10] [--rank 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import arrayopt as ao  # noqa: E402


def grads_for(shape, k=4, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.arange(1, shape[0] + 1, dtype=np.float32)[:, None] ** -0.5
    return [(rng.normal(size=shape).astype(np.float32) * scales) for _ in range(k)]


def load_peer(path):
    if not os.path.isdir(os.path.join(path, "precondition", "tearfree")):
        return None, f"no checkout at {path}"
    sys.path.insert(0, path)
    try:
        from precondition.tearfree import sketchy as tf_sketchy
    except ImportError as e:
        return None, f"import failed: {e}"
    return tf_sketchy, ""


class Ours:
    name = "ao"

    def __init__(self, shape, rank, freq):
        self.opt = ao.sketchy(rank=rank, tail_decay="sqrt", update_every=freq, graft="none", b1=0.0,
                              learning_rate=1.0, merge_small_dims=1, skip_preconditioning_dim_size_gt=None)
        self.params = np.zeros(shape, np.float32)
        self.state = self.opt.init(self.params)

    def direction(self, g):
        u, self.state = self.opt.update(g, self.state, self.params)
        return -u

    def nbytes(self):
        return ao.state_nbytes(self.state)


class Tearfree:
    name = "tearfree"

    def __init__(self, shape, rank, freq, module):
        import jax
        import jax.numpy as jnp

        tx = module.apply(module.Options(rank=rank, update_freq=freq))
        self.jnp = jnp
        self.state = tx.init(jnp.zeros(shape, jnp.float32))
        self.update = jax.jit(lambda g, s: tx.update(g, s, None))

    def direction(self, g):
        d, self.state = self.update(self.jnp.asarray(g), self.state)
        d.block_until_ready()
        return np.asarray(d)

    def nbytes(self):
        import jax

        return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self.state))


def time_steps(c, grads, n):
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        c.direction(grads[i % len(grads)])
        out.append(time.perf_counter() - t0)
    return out


def cosines(shape, rank, freq, module, steps):
    grads = grads_for(shape, seed=1)
    a, b = Ours(shape, rank, freq), Tearfree(shape, rank, freq, module)
    out = []
    for i in range(steps):
        x = a.direction(grads[i % 4]).ravel().astype(np.float64)
        y = b.direction(grads[i % 4]).ravel().astype(np.float64)
        out.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    return out, a.nbytes(), b.nbytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1024x1024")
    ap.add_argument("--freqs", default="1,10")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peer", default=os.environ.get("PRECONDITION_PATH", "/tmp/precondition"))
    args = ap.parse_args()
    module, why = load_peer(args.peer)
    if module is None:
        print(f"tearfree Sketchy skipped ({why}); see this script's docstring to get it")
    print("| shape | F | ao ms/step | tearfree ms/step | ao / tearfree | cos min | ao state B | tearfree state B |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]:
        grads = grads_for(shape)
        for freq in [int(f) for f in args.freqs.split(",")]:
            n = freq if freq > 1 else 3
            cs = [Ours(shape, args.rank, freq)] + ([Tearfree(shape, args.rank, freq, module)] if module else [])
            for c in cs:  # warm-up: compilation, first allocation
                time_steps(c, grads, 1)
            times = {c.name: [] for c in cs}
            for _ in range(args.rounds):  # interleaved rounds
                for c in cs:
                    t = time_steps(c, grads, n)
                    times[c.name].append(statistics.median(t) if freq == 1 else statistics.fmean(t))
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            if module:
                cos, nb_a, nb_t = cosines(shape, args.rank, freq, module, 2 * freq + 2)
                print(f"| {shape[0]}x{shape[1]} | {freq} | {ms['ao']:.1f} | {ms['tearfree']:.1f} | "
                      f"{ms['ao'] / ms['tearfree']:.2f} | {min(cos):.6f} | {nb_a:,} | {nb_t:,} |")
            else:
                print(f"| {shape[0]}x{shape[1]} | {freq} | {ms['ao']:.1f} | - | - | - | {cs[0].nbytes():,} | - |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
