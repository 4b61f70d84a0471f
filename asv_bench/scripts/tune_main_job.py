"""Learning-rate grid of the registered optimizers on the main job (``python -m arrayopt.demo``).

Each rate of the grid runs the main job's digits task (its epochs, batch size, seeds 0..2 and
initial params) through ``arrayopt.demo.cli.main`` with ``--lr NAME=RATE``; the table is the
mean final train loss above the floor (the target entropy) per rate, and the winner is the rate
with the lowest mean. Register the winners in ``arrayopt/__init__.py``.

Usage (from the repository root)::

    python asv_bench/scripts/tune_main_job.py                      # every registered optimizer
    python asv_bench/scripts/tune_main_job.py --optimizers eva,eva_f --factors 0.01,0.03,0.1,0.3,1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import arrayopt as ao  # noqa: E402
from arrayopt.demo import cli  # noqa: E402


def registered_rate(name: str) -> float:
    return float(ao.registry.make(name).learning_rate)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizers", default=",".join(ao.registry.registered()))
    p.add_argument("--factors", default="0.1,0.3,1,3,10",
                   help="the grid, as multiples of each optimizer's registered learning rate")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    factors = [float(x) for x in args.factors.split(",")]
    print(f"{'optimizer':<14} " + " ".join(f"{'x' + format(f, 'g'):>16}" for f in factors) + "   best rate")
    for name in args.optimizers.split(","):
        base = registered_rate(name)
        cells = []
        for f in factors:
            with tempfile.TemporaryDirectory() as out:
                code = cli.main(["--optimizers", name, "--lr", f"{name}={base * f:g}", "--seeds", str(args.seeds),
                                 "--no-progress", "--out", out])
                with open(os.path.join(out, "results.json")) as fh:
                    data = json.load(fh)
            cells.append((base * f, data, code))
        scores = [_mean_excess(d) for _, d, _ in cells]
        best = min(range(len(factors)), key=lambda i: scores[i])
        print(f"{name:<14} " + " ".join(f"{s:>16.3f}" for s in scores) + f"   {cells[best][0]:g}", flush=True)
    return 0


def _mean_excess(data) -> float:
    """Mean over the seeds of the final train loss above the floor; inf when a run failed or diverged."""
    runs = data["results"]
    floor = data["config"]["loss_floor_train"]
    if any(r["failed"] or r["diverged"] for r in runs):
        return float("inf")
    return sum(r["final_train_loss"] - floor for r in runs) / len(runs)


if __name__ == "__main__":
    sys.exit(main())
