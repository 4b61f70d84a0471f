"""Command line of the GPU check (see the package docstring)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback

from . import gpu_tests, measure, report

NO_DEVICE = 2

INSTALL_LINE = 'pip install ".[gpu-check]"'


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m arrayopt.gpu_check",
                                description="Run the GPU tests and time every CUDA path on one device.")
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the test log")
    p.add_argument("--quick", action="store_true", help="1M and 10M params, fewer rounds (< 2 min)")
    p.add_argument("--skip-tests", action="store_true", help="measure only")
    p.add_argument("--tests", default=None, help="the tests/ folder (default: found from the checkout)")
    return p


def main(argv=None, layer=None, plan=None) -> int:
    """Run the check; ``layer`` and ``plan`` replace the CUDA device and the sizes (tests)."""
    args = _parser().parse_args(argv)
    if layer is None:
        from .layer import CupyLayer

        ok, reason = CupyLayer.probe()
        if not ok:
            print(f"arrayopt.gpu_check: no CUDA device here ({reason}). Run it on a machine with "
                  f"an NVIDIA GPU, after {INSTALL_LINE}.", file=sys.stderr)
            return NO_DEVICE
        layer = CupyLayer()
    plan = plan or (measure.Plan.quick() if args.quick else measure.Plan.full())
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    result = {"date": datetime.date.today().isoformat(), "quick": bool(args.quick),
              "info": layer.info(), "rows": [], "errors": []}
    if args.skip_tests:
        result["tests"] = {"ran": False, "note": "--skip-tests"}
    else:
        print("running the GPU tests ...", flush=True)
        result["tests"] = gpu_tests.run(args.out, args.tests or gpu_tests.find_tests())
    for section in (measure.first_order, measure.sonew, measure.shampoo, measure.real_trees):  # looked up per run
        print(f"measuring {section.__name__} ...", flush=True)
        try:
            result["rows"] += section(layer, plan)
        except Exception as e:  # one broken section must not cost the others' figures
            result["errors"].append({"section": section.__name__,
                                     "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()})
        finally:
            layer.free_pools()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    _js, _md, text = report.write(result, args.out)
    print(text)
    failed = result["tests"].get("failed", 0) or (result["tests"].get("ran") and
                                                  result["tests"].get("returncode") not in (0, 5))
    return 1 if failed or result["errors"] else 0
