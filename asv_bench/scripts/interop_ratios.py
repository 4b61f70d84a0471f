#!/usr/bin/env python
"""Print the framework adapters' per-step ratios (``benchmarks/interop.py``) as markdown.

    python asv_bench/scripts/interop_ratios.py            # 1M and 10M float32 params
    python asv_bench/scripts/interop_ratios.py --size 1M --threads 1   # steadier on a loaded machine
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import set_threads  # noqa: E402
from benchmarks.interop import RATIOS, SIZES, measure_interop  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), action="append")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="threads for Numba and torch")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    for size in args.size or list(SIZES):
        res = measure_interop(SIZES[size], rounds=args.rounds)
        print(f"\n{size} float32 params, medians (ms): "
              + ", ".join(f"{k} {v:.3f}" for k, v in res["ms"].items()))
        print("\n| ratio | value |\n|---|---|")
        for name in RATIOS:
            if name in res["ratios"]:
                print(f"| {name} | {res['ratios'][name]:.2f} |")
        for what, why in res["skipped"].items():
            print(f"(skipped {what}: {why})")


if __name__ == "__main__":
    main()
