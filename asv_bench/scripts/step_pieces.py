#!/usr/bin/env python
"""Where the first-order, SONew and Eva-s steps go: the figures behind the "what bounds each miss"
notes of ``docs/performance.md``. Three parts, each in this one process, 2 threads:

1. ``tree``: on ResNet-18's tree, each step against torch fused Adam (interleaved, medians), the
   same step with its pre-pass replaced by nothing (Adam: the finiteness pre-pass; SONew: the range
   check ``‖g‖² < 2⁻⁴⁸·max``), and the Numba kernels timed inside the step;
2. ``cache``: the Adam kernel and the diagonal and tridiagonal SONew block drivers on one float32
   leaf of ``--n`` entries that stays in cache, repeated;
3. ``leaves``: per-leaf costs on 256 leaves of 8 entries: whole steps, and the pieces of Adam's.

    python asv_bench/scripts/step_pieces.py                # all three
    python asv_bench/scripts/step_pieces.py --part tree --rounds 30

Timing only: the pre-passes are replaced with ``unittest.mock.patch`` while their variant is timed.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import set_threads  # noqa: E402
from benchmarks.real_trees import SHAPES, TreeData, build, tiny_leaves_shapes  # noqa: E402


def _median_ms(fn, n, before=None):
    ts = []
    for _ in range(n):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _timed(acc, name, f):
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return f(*a, **kw)
        finally:
            acc[name] += time.perf_counter() - t0
    return wrapper


def part_tree(rounds):
    import arrayopt.base as base
    from arrayopt.backends.numba_cpu import BACKEND, _eva_s
    from arrayopt.backends.numba_cpu.sonew import blocks

    data = TreeData(SHAPES["resnet18"]())
    names = ["torch Adam fused", "ao adam", "ao sonew tri", "ao eva_s"]
    fns = {n: build(n, data) for n in names}
    no_prepass = {"ao adam": mock.patch.object(type(BACKEND), "all_finite", lambda self, views: True),
                  "ao sonew tri": mock.patch.object(base, "gradients_in_range", lambda views: True)}
    acc = collections.Counter()
    kernels = [mock.patch.object(blocks, "blocks_step_tri", _timed(acc, "sonew tri kernel", blocks.blocks_step_tri))]
    for name, table in (("eva_s sums", _eva_s._SUMS), ("eva_s contraction", _eva_s._CONTRACT),
                        ("eva_s write", _eva_s.APPLY)):
        kernels.append(mock.patch.dict(table, {k: _timed(acc, name, f) for k, f in table.items()}))
    med = collections.defaultdict(list)
    for _ in range(rounds):
        for n in names:
            med[n].append(_median_ms(fns[n], 5))
        for n, patch in no_prepass.items():
            with patch:
                med[n + ", no pre-pass"].append(_median_ms(fns[n], 5))
    steps = {"ao sonew tri": 0, "ao eva_s": 0}
    for p in kernels:
        p.start()
    try:
        for n in steps:
            for _ in range(rounds * 5):
                fns[n]()
                steps[n] += 1
    finally:
        for p in kernels:
            p.stop()
    print(f"### ResNet-18 tree, {rounds} rounds of 5 steps (median of the round medians, ms)\n")
    print("| step | ms | × torch fused Adam |\n|---|---:|---:|")
    ref = statistics.median(med["torch Adam fused"])
    for n, ms in med.items():
        print(f"| {n} | {statistics.median(ms):.2f} | {statistics.median(ms) / ref:.2f} |")
    print("\n| kernel inside the step | ms a step |\n|---|---:|")
    for name, total in acc.items():
        owner = "ao sonew tri" if name.startswith("sonew") else "ao eva_s"
        print(f"| {name} | {total / steps[owner] * 1e3:.2f} |")
    print()


def part_cache(n, reps):
    import numpy as np

    from arrayopt.backends.numba_cpu.first_order import kernel_for
    from arrayopt.backends.numba_cpu.sonew.block_kernels import blocks_step_diag, blocks_step_tri

    f = np.float32
    rng = np.random.default_rng(0)
    p, g, m = (rng.standard_normal(n).astype(f) for _ in range(3))
    h = np.abs(rng.standard_normal(n)).astype(f)
    band = np.abs(rng.standard_normal(2 * n)).astype(f)
    removed = np.zeros(-(-n // 16384), np.int64)
    nu = np.zeros(1, f)
    adam = kernel_for("adam", 2, n)
    common = (f(1e-8), 1, f(1e-3), f(1e-8), True, f(0.1), f(-1e-6), f(0.0), False, removed)
    runs = {
        "Adam kernel": lambda: adam(p, g, m, h, f(1e-6), f(0.1), f(0.999), f(0.001), f(0.5), f(1e-8), f(0), f(1)),
        "SONew diagonal blocks": lambda: blocks_step_diag(p, g, m, h, nu, 16384, 2, f(0.1), f(0.999), f(0.001),
                                                          f(0.5), f(0.3), *common),
        "SONew tridiagonal blocks": lambda: blocks_step_tri(p, g, m, band, nu, 16384, 2, f(0.1), f(0.999),
                                                            f(0.001), f(2.0), f(3.0), *common),
    }
    for fn in runs.values():
        fn()
    times = {k: _median_ms(fn, reps) for k, fn in runs.items()}
    print(f"### In cache: one float32 leaf of {n} entries, 2 threads, median of {reps} calls\n")
    print("| kernel | ms | × Adam kernel |\n|---|---:|---:|")
    for k, ms in times.items():
        print(f"| {k} | {ms:.3f} | {ms / times['Adam kernel']:.2f} |")
    print()


def part_leaves(reps):
    import arrayopt as ao
    from arrayopt import _tree, _validate
    from arrayopt._overflow import gradients_in_range
    from arrayopt.backends.numba_cpu import BACKEND
    from arrayopt.backends.numba_cpu import first_order

    k = 256
    data = TreeData(tiny_leaves_shapes(k, 8))
    fns = {n: build(n, data) for n in ("torch Adam fused", "ao adam", "ao sonew tri", "ao eva_s")}
    opt = ao.adam(1e-6)
    state = opt.init(data.params)
    params, grads = list(data.params.values()), list(data.grads[0].values())
    ns = _validate.check_params(data.params)[3]
    groups = (params, grads, state["mu"], state["nu"])
    step = opt.step_description(0)
    pieces = {
        "check_params": lambda: _validate.check_params(data.params),
        "flatten the grads": lambda: _tree.flatten(data.grads[0]),
        "refusal checks (refuse_leaves)": lambda: BACKEND.refuse_leaves("adam", ns, *groups),
        "finiteness pre-pass": lambda: BACKEND.all_finite(BACKEND.views(grads)),
        "range check (SONew's)": lambda: gradients_in_range(BACKEND.views(grads)),
        "Adam kernel call with its address table": lambda: first_order.run(
            BACKEND, "adam", params, grads, [state["mu"], state["nu"]], step),
    }
    print(f"### Per leaf: {k} leaves of 8 float32 entries, median of {reps} calls, µs a leaf\n")
    print("| | µs a leaf |\n|---|---:|")
    for name, fn in list(fns.items()) + list(pieces.items()):
        label = f"whole step, {name}" if name in fns else f"ao adam: {name}"
        print(f"| {label} | {_median_ms(fn, reps) * 1e3 / k:.2f} |")
    print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["tree", "cache", "leaves", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args(argv)
    set_threads(2)
    if args.part in ("tree", "all"):
        part_tree(args.rounds)
    if args.part in ("cache", "all"):
        part_cache(args.n, args.reps)
    if args.part in ("leaves", "all"):
        part_leaves(args.reps)


if __name__ == "__main__":
    main()
