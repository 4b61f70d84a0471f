#!/usr/bin/env python
"""Where one contender's step goes on a real-model tree: cProfile of one timed call (after two
untimed ones), the functions by their own time. Contenders and trees as in ``real_trees.py``
(an F=10 contender's call is a whole 10-step root cycle).

    python asv_bench/scripts/profile_tree_step.py "ao shampoo F=1 f32 per-dim"
    python asv_bench/scripts/profile_tree_step.py "ao sketchy" --tree resnet18 --top 12
    python asv_bench/scripts/profile_tree_step.py "ao shampoo F=10" --tree tiny   # 256 leaves of 8
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import set_threads  # noqa: E402
from benchmarks.real_trees import CONTENDERS, SHAPES, TreeData, build, tiny_leaves_shapes  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("contender", choices=sorted(CONTENDERS))
    ap.add_argument("--tree", default="resnet18", choices=sorted(SHAPES) + ["tiny"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    args = ap.parse_args(argv)
    set_threads(args.threads)
    data = TreeData(tiny_leaves_shapes(256, 8) if args.tree == "tiny" else SHAPES[args.tree]())
    fn = build(args.contender, data)
    if fn is None:
        sys.exit(f"{args.contender}: its peer library is not installed")
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        print(f"untimed call: {time.perf_counter() - t0:.3f} s")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    print(f"profiled call: {time.perf_counter() - t0:.3f} s")
    pstats.Stats(prof).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
