#!/usr/bin/env python
"""Optimizer steps on real models' parameter trees (ResNet-18, GPT-2 small): ratios to torch fused Adam.

Everything runs in ONE process with 2 threads for every contender (torch and Numba), the
contenders interleaved round-robin (the order rotates each round). Each round times one call
per contender (one step, or a whole cycle of F steps for the F=10 contenders: the amortized
step) and takes its ratio to torch fused Adam's step in the same round; the table shows the
median ratio over the rounds and its min–max. Trees and contenders:
``asv_bench/benchmarks/real_trees.py``. Peers absent from the environment are listed and left out.

On GPT-2 the contenders run in groups of ``--group`` (each group with its own torch fused Adam
row), so that only a few optimizer states are alive at a time.

The fixed-cost fit (``--fit``) times each of ``FIT_CONTENDERS`` on trees of many tiny 1-D leaves
and fits ``time = a + b·leaves + c·params`` by least squares: ``b`` is the fixed cost per leaf.

    python asv_bench/scripts/real_trees.py --quick                # < 3 minutes
    python asv_bench/scripts/real_trees.py --trees resnet18 --rounds 7
    python asv_bench/scripts/real_trees.py --trees gpt2 --contenders "ao shampoo F=10" --rounds 3
    python asv_bench/scripts/real_trees.py --fit-only
    python asv_bench/scripts/real_trees.py --trees resnet18 --contenders "po SOAP F=10,ao shampoo EC-QR F=10,ao shampoo EC-QR F=10 (reference)"

``"<ours> (reference)"`` is that contender with the reference forced (no kernel): the kernels' gain
in the same rounds.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import env_info, set_threads  # noqa: E402
from benchmarks.real_trees import (  # noqa: E402
    CONTENDERS, FIT_CONTENDERS, REFERENCE, SHAPES, TreeData, build, peer_of, spec, tiny_leaves_shapes,
)

#: --quick: what runs (GPT-2 keeps the rows whose step is under a few seconds)
QUICK = {
    "resnet18": [n for n in CONTENDERS if n != "torch Adam foreach"] + ["torch Adam foreach"],
    "gpt2": ["torch Adam fused", "ao adam", "ao sonew tri", "ao shampoo F=10", "ao shampoo EC-QR F=10",
             "po ScalableShampoo F=10", "ao eva_s"],
}
FIT_TREES = [(8, 8), (64, 8), (256, 8), (8, 64), (64, 64), (256, 64)]


def _known(name: str) -> bool:
    try:
        spec(name)
    except KeyError:
        return False
    return True


def rounds_of(fns: dict, rounds: int) -> dict:
    """name -> seconds per step, one sample per round (contenders interleaved, order rotating)."""
    names = list(fns)
    out = {k: [] for k in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t0) / spec(name)[2])
    return out


def run_group(data, names, rounds, absent):
    fns = {}
    for n in [REFERENCE] + [x for x in names if x != REFERENCE]:
        fn = build(n, data)
        if fn is None:
            absent.add(n)
        else:
            fns[n] = fn
    samples = rounds_of(fns, rounds)
    ref = samples[REFERENCE]
    rows = {n: (s, [a / b for a, b in zip(s, ref)]) for n, s in samples.items()}
    del fns
    gc.collect()
    return rows


def tree_table(tree, names, rounds, group, absent):
    data = TreeData(SHAPES[tree]())
    print(f"\n### {tree}: {data.n_leaves} leaves, {data.n_params / 1e6:.1f}M params, {rounds} rounds\n")
    print("| contender | ms/step (median) | x torch fused Adam (median) | min–max |")
    print("|---|---:|---:|---|")
    others = [n for n in names if n != REFERENCE]
    groups = [others[i:i + group] for i in range(0, len(others), group)] or [[]]
    against = []
    for g in groups:
        rows = run_group(data, g, rounds, absent)
        for n, (s, r) in rows.items():
            if n == REFERENCE and g is not groups[0]:
                continue
            print(f"| {n} | {1e3 * statistics.median(s):.2f} | {statistics.median(r):.2f} | "
                  f"{min(r):.2f}–{max(r):.2f} |", flush=True)
        against += [(n, peer_of(n), [a / b for a, b in zip(rows[n][0], rows[peer_of(n)][0])])
                    for n in rows if peer_of(n) in rows]
    if against:  # the same rounds: each ratio from one pass over the contenders
        print("\n| contender | x its peer (median of rounds) | min–max | peer |")
        print("|---|---:|---|---|")
        for n, peer, r in against:
            print(f"| {n} | {statistics.median(r):.2f} | {min(r):.2f}–{max(r):.2f} | {peer} |", flush=True)


def lstsq3(rows):
    """``(a, b, c)`` minimising ``Σ (a + b·L + c·N − t)²`` over ``rows = [(L, N, t)]``."""
    import numpy as np

    A = np.array([[1.0, L, N] for L, N, _ in rows])
    y = np.array([t for _, _, t in rows])
    return np.linalg.lstsq(A, y, rcond=None)[0]


def fit_table(rounds, absent, names=FIT_CONTENDERS):
    print(f"\n### fixed cost per leaf: time = a + b·leaves + c·params over trees of tiny 1-D leaves "
          f"{FIT_TREES} (leaves, size), {rounds} rounds\n")
    print("| contender | a (µs) | b: µs per leaf | c: ns per param |")
    print("|---|---:|---:|---:|")
    per = {n: [] for n in names}
    for L, size in FIT_TREES:
        data = TreeData(tiny_leaves_shapes(L, size))
        fns = {n: build(n, data, warmup=2) for n in names}
        for n in [n for n, f in fns.items() if f is None]:
            absent.add(n)
            del fns[n]
        samples = rounds_of(fns, rounds)
        for n, s in samples.items():
            per[n].append((L, L * size, statistics.median(s)))
    for n, rows in per.items():
        if rows:
            a, b, c = lstsq3(rows)
            print(f"| {n} | {a * 1e6:.1f} | {b * 1e6:.2f} | {c * 1e9:.3f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", default="resnet18,gpt2")
    ap.add_argument("--contenders", default=None, help="comma-separated names (default: all; --quick: a subset)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gpt2-rounds", type=int, default=None, help="rounds on GPT-2 (default: --rounds)")
    ap.add_argument("--group", type=int, default=4, help="contenders alive at a time on GPT-2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fit", action="store_true", help="also the per-leaf fixed-cost fit")
    ap.add_argument("--fit-only", action="store_true")
    ap.add_argument("--fit-rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 rounds, GPT-2 subset, 2 GPT-2 rounds, the fit")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    if args.quick:
        args.rounds, args.gpt2_rounds, args.fit, args.fit_rounds = 3, 2, True, 3
    print(env_info() if callable(env_info) else "")
    absent: set = set()
    t0 = time.perf_counter()
    if not args.fit_only:
        for tree in args.trees.split(","):
            if args.contenders:
                names = [n.strip() for n in args.contenders.split(",")]
                unknown = [n for n in names if not _known(n)]
                if unknown:
                    raise SystemExit(f"--contenders: unknown {unknown}; known: {list(CONTENDERS)}")
            else:
                names = QUICK[tree] if args.quick else list(CONTENDERS)
            rounds = args.gpt2_rounds if tree == "gpt2" and args.gpt2_rounds else args.rounds
            tree_table(tree, names, rounds, args.group if tree == "gpt2" else len(names), absent)
    if args.fit or args.fit_only:
        fit_table(args.fit_rounds, absent)
    if absent:
        print(f"\nabsent (library not installed): {', '.join(sorted(absent))}")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
