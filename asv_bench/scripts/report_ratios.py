#!/usr/bin/env python
"""Run the asv suite's ratio measurements directly (no asv) and print markdown tables.

The measurement code is that of ``benchmarks/common.py`` (``measure``,
``measure_grid``), so the figures match ``AdamRatios.track_ratio`` and can be
pasted into docs/performance.md. Everything for one size runs in this one process,
contenders interleaved round-robin; figures are medians over all timed calls.

    python asv_bench/scripts/report_ratios.py                      # ratios at 1M and 10M float32
    python asv_bench/scripts/report_ratios.py --grid               # + optimizer x backend step grid
    python asv_bench/scripts/report_ratios.py --repeat 3 --json out.json
    python asv_bench/scripts/report_ratios.py --threads 1          # steadier on a loaded 2-core machine

``--repeat R`` repeats the whole measurement R times (sizes interleaved) and
reports, for each figure, the median of the R per-run medians, with their range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    ADAM_BYTES,
    AXPY_BYTES,
    RATIOS,
    SIZES,
    STEP_BYTES,
    env_info,
    measure,
    measure_grid,
    set_threads,
)

LABELS = {
    "numba_adam": "arrayopt `ao.adam().step` (Numba, pre-pass + kernel)",
    "kernel_adam_check": "Numba Adam kernel + finiteness pre-pass (direct calls)",
    "kernel_adam_nocheck": "Numba Adam kernel alone (direct call)",
    "prepass_only": "finiteness pre-pass alone (read-only, 4 B/param)",
    "reference_adam": "arrayopt `ao.adam().step` (reference path)",
    "torch_fused_adam": "`torch.optim.Adam(fused=True)`",
    "axpy": "Numba in-place axpy `a += s*b` (12 B/elem)",
}
BYTES = {"axpy": AXPY_BYTES, "prepass_only": 4, "kernel_adam_check": ADAM_BYTES + 4, "numba_adam": ADAM_BYTES + 4}


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _rng(xs):
    xs = [x for x in xs if x is not None]
    return f"{min(xs):.2f}-{max(xs):.2f}" if len(xs) > 1 else ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated keys of SIZES (default: all)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per measurement")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the whole measurement (sizes interleaved)")
    ap.add_argument("--grid", action="store_true", help="also time every optimizer x backend step")
    ap.add_argument("--grid-rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None,
                    help="Numba and torch threads (default: their defaults, all CPUs)")
    ap.add_argument("--json", default=None, help="write all medians to this file")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"--sizes: unknown size {s!r}; choose from {list(SIZES)}")

    runs = {s: [] for s in sizes}
    grids = {s: [] for s in sizes}
    for r in range(args.repeat):
        for s in sizes:
            res = measure(SIZES[s], rounds=args.rounds)
            res["min_ms"] = {k: 1e3 * min(v) for k, v in res.pop("samples_s").items() if v}
            runs[s].append(res)
            print(f"[run {r + 1}/{args.repeat}] {s}: axpy {res.get('axpy_gbs', float('nan')):.1f} GB/s, "
                  + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items() if v is not None),
                  file=sys.stderr, flush=True)
            if args.grid:
                grids[s].append(measure_grid(SIZES[s], rounds=args.grid_rounds))

    info = env_info()
    print(f"\n<!-- {info} -->\n")
    print(f"Machine: {info['cpu']}, {info['ncpu']} CPUs; numba {info['numba']} "
          f"({info['numba_threads']} threads, {info['numba_threading_layer']}), numpy {info['numpy']}, "
          f"torch {info.get('torch')} ({info.get('torch_threads')} threads). float32, one flat array; "
          f"{args.rounds} interleaved rounds x {args.repeat} run(s), medians.\n")

    summary = {"env": info, "sizes": {}}
    for s in sizes:
        n = SIZES[s]
        rs = runs[s]
        floor = _med([r.get("floor_ms") for r in rs])
        bw = _med([r.get("axpy_gbs") for r in rs])
        print(f"### Adam step, {n:,} float32 params (floor {floor:.3f} ms = 28 B/param at "
              f"in-place axpy {bw:.1f} GB/s)\n")
        print("| contender | median ms | range of run medians | min ms | x floor | effective GB/s |")
        print("|---|---|---|---|---|---|")
        names = [k for k in LABELS if any(k in r["ms"] for r in rs)]
        ms_sum = {}
        for k in names:
            ms = _med([r["ms"].get(k) for r in rs])
            ms_sum[k] = ms
            nbytes = BYTES.get(k, ADAM_BYTES) * n
            mn = min(r["min_ms"][k] for r in rs if k in r["min_ms"])
            print(f"| {LABELS[k]} | {ms:.3f} | {_rng([r['ms'].get(k) for r in rs])} | {mn:.3f} | {ms / floor:.2f} | "
                  f"{nbytes / (ms * 1e-3) / 1e9:.1f} |")
        skipped = {k: v for r in rs for k, v in r["skipped"].items()}
        for k, why in skipped.items():
            print(f"| {LABELS.get(k, k)} | skipped: {why} | | | | |")
        print()
        summary["sizes"][s] = {"n": n, "floor_ms": floor, "axpy_gbs": bw, "ms": ms_sum,
                               "ratios": {k: _med([r["ratios"][k] for r in rs]) for k in RATIOS},
                               "skipped": skipped}

    print("### Ratios (median of per-run ratios of medians)\n")
    print("| ratio | " + " | ".join(sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for k in RATIOS:
        cells = []
        for s in sizes:
            v = summary["sizes"][s]["ratios"][k]
            rg = _rng([r["ratios"][k] for r in runs[s]])
            cells.append("n/a" if v is None else f"{v:.2f}" + (f" ({rg})" if rg else ""))
        print(f"| {k} | " + " | ".join(cells) + " |")
    print()
    for s in sizes:
        ms = summary["sizes"][s]["ms"]
        if "kernel_adam_check" in ms and "kernel_adam_nocheck" in ms:
            extra = ms["kernel_adam_check"] - ms["kernel_adam_nocheck"]
            over = ms.get("numba_adam", float("nan")) - ms["kernel_adam_check"]
            print(f"- {s}: finiteness pre-pass costs {extra:.3f} ms per step "
                  f"({100 * extra / ms['kernel_adam_nocheck']:.0f}% of the kernel; alone {ms.get('prepass_only', float('nan')):.3f} ms); "
                  f"`opt.step` minus the direct calls: {over:.3f} ms (Python validation and dispatch, plus noise).")
    print()

    if args.grid:
        print("### `opt.step` per optimizer x backend (median ms; x floor = ms / (bytes/param x n / axpy GB/s))\n")
        hdr = " | ".join(f"{s} ms | {s} x floor" for s in sizes)
        print(f"| optimizer | backend | B/param | {hdr} |")
        print("|---|---|---|" + "---|---|" * len(sizes))
        keys = sorted({k for s in sizes for g in grids[s] for k in g["ms"]},
                      key=lambda k: (list(STEP_BYTES).index(k[0]), k[1]))
        summary["grid"] = {}
        for k in keys:
            cells = []
            for s in sizes:
                ms = _med([g["ms"].get(k) for g in grids[s]])
                xf = _med([g["x_floor"].get(k) for g in grids[s]])
                cells.append("n/a | n/a" if ms is None else f"{ms:.3f} | {xf:.2f}")
                summary["grid"][f"{k[0]}/{k[1]}/{s}"] = {"ms": ms, "x_floor": xf}
            print(f"| {k[0]} | {k[1]} | {STEP_BYTES[k[0]]} | " + " | ".join(cells) + " |")
        print()

    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
