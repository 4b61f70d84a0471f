"""SONew steps: time per band, state bytes per band, and ratios to our Adam measured in one run.

- ``SONewStep.time_step``: ``ao.sonew(band=b).step`` (defaults: relative eps,
  Adam graft) for b in {0, 1, 4}, backend numba_cpu / reference, 1M and 10M
  float32 params in one flat array.
- ``SONewStep.track_state_bytes``: optimizer state bytes per band (Adam: 8 B/param).
- ``SONewRatios.track_ratio``: in ONE process (``setup_cache``), contenders
  interleaved round-robin, ratio of medians (``common.interleaved``):

  ``tridiag/adam``        tridiagonal SONew step / our Adam step (Numba, 10M f32); target ≤ 1.35
  ``tridiag_nograft/adam`` the same with ``graft="none"`` (no second pass for the norm)
  ``band4/adam``          band-4 SONew / Adam; target ≤ 3
  ``diag/adam``           diag-SONew / Adam
  ``tridiag/floor``       tridiagonal step / its memory floor (``TRIDIAG_BYTES`` at the axpy bandwidth)

``python asv_bench/benchmarks/sonew.py`` prints the same figures without asv.
"""

from __future__ import annotations

import numpy as np

from .common import (AXPY_BYTES, SIZES, Axpy, OptimizerStep, Stepper, ao, interleaved, make_data, medians_ms,
                     warm_up)

BANDS = {"diag": 0, "tridiag": 1, "band4": 4}
# bytes per float32 param the exact tridiagonal step must stream (graft="adam"): finiteness pre-pass
# (read g: 4) + statistics (read g, m, d, e; write m, d, e: 28) + factor/apply/‖u‖ (read m, d, e;
# write u with its read-for-ownership: 20) + grafted update (read p, u; write p: 12)
TRIDIAG_BYTES = 64
LR = 1e-3


class SONewStepper(Stepper):
    """``opt.step`` of SONew on one flat float32 param of ``n`` elements (numba_cpu or reference)."""

    def __init__(self, band: int, backend: str, n: int, warmup: int = 2, **kw):
        self.opt = ao.sonew(LR, band=band, **{"block_size": None, **kw})  # whole tensor unless told
        self.backend = backend
        self.p, self.g = make_data(n)
        self.state = self.opt.init(self.p)
        for _ in range(warmup):
            self()


class SONewStep:
    params = (list(BANDS), ["numba_cpu", "reference"], list(SIZES))
    param_names = ["band", "backend", "size"]
    timeout = 300

    def setup(self, band, backend, size):
        warm_up()
        self.stepper = SONewStepper(BANDS[band], backend, SIZES[size])

    def time_step(self, band, backend, size):
        self.stepper()

    def track_state_bytes(self, band, backend, size):
        return ao.state_nbytes(self.stepper.state)

    track_state_bytes.unit = "bytes"


def measure_ratios(n: int = SIZES["10M"], rounds: int = 9, steps: int = 2) -> dict:
    """SONew / Adam step ratios, all Numba, measured interleaved in this process."""
    warm_up()
    built = {
        "adam": OptimizerStep("adam", "numba_cpu", n),
        "diag": SONewStepper(0, "numba_cpu", n),
        "tridiag": SONewStepper(1, "numba_cpu", n),
        "tridiag_nograft": SONewStepper(1, "numba_cpu", n, graft="none"),
        "band4": SONewStepper(4, "numba_cpu", n),
        "axpy": Axpy(n),
    }
    med = medians_ms(interleaved(built, rounds, steps))
    out = {"n": n, "ms": med}
    for k in ("diag", "tridiag", "tridiag_nograft", "band4"):
        out[f"{k}/adam"] = med[k] / med["adam"]
    # the exact method's memory floor: TRIDIAG_BYTES at the in-place bandwidth of the axpy probe
    out["tridiag/floor"] = med["tridiag"] / (med["axpy"] * TRIDIAG_BYTES / AXPY_BYTES)
    out["state_bytes_per_param"] = {k: ao.state_nbytes(v.state) / n for k, v in built.items() if k != "axpy"}
    return out


# bytes per float32 param of a one-pass block-local step (read g; read+write p, m and the b+1 band columns);
# the finiteness pre-pass (4 B) is left out, as in Adam's 28 B
BLOCK_BYTES = {"diag": 28, "tridiag": 36, "band4": 60}


def measure_block_ratios(n: int = SIZES["10M"], block_sizes=(16384,), rounds: int = 7, steps: int = 2,
                         bands=("diag", "tridiag", "band4")) -> dict:
    """Block-local and whole-tensor SONew (Adam graft) / our Adam step, all Numba, interleaved in one run.

    ``<band>@<B>``: ``block_size=B``; ``<band>``: whole tensor. ``<name>/floor``: the step over its own
    bytes floor (``BLOCK_BYTES`` at the axpy bandwidth measured in the same rounds).
    """
    warm_up()
    built = {"adam": OptimizerStep("adam", "numba_cpu", n), "axpy": Axpy(n)}
    for name in bands:
        built[name] = SONewStepper(BANDS[name], "numba_cpu", n)
        for bs in block_sizes:
            built[f"{name}@{bs}"] = SONewStepper(BANDS[name], "numba_cpu", n, block_size=bs)
    med = medians_ms(interleaved(built, rounds, steps))
    out = {"n": n, "ms": med}
    for k in built:
        if k not in ("adam", "axpy"):
            out[f"{k}/adam"] = med[k] / med["adam"]
            out[f"{k}/floor"] = med[k] / (med["axpy"] * BLOCK_BYTES[k.split("@")[0]] / AXPY_BYTES)
    out["adam/floor"] = med["adam"] / (med["axpy"] * 28 / AXPY_BYTES)
    return out


class SONewBlockRatios:
    """Block-local SONew (the default ``block_size``) / our Adam step, measured in one run."""

    timeout = 900
    params = ([f"{b}@16384/adam" for b in BANDS] + [f"{b}/adam" for b in BANDS],)
    param_names = ["ratio"]

    def setup_cache(self):
        return measure_block_ratios()

    def track_ratio(self, cache, ratio):
        return cache[ratio]

    track_ratio.unit = "x our Adam"


class SONewRatios:
    timeout = 900
    params = (["diag/adam", "tridiag/adam", "tridiag_nograft/adam", "band4/adam", "tridiag/floor"],)
    param_names = ["ratio"]

    def setup_cache(self):
        return measure_ratios()

    def track_ratio(self, cache, ratio):
        return cache[ratio]

    track_ratio.unit = "x our Adam"


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    n = int(float(sys.argv[1])) if len(sys.argv) > 1 else SIZES["10M"]
    r = measure_ratios(n)
    print(json.dumps(r, indent=1))
    ref = {}
    for name, b in BANDS.items():
        st = SONewStepper(b, "reference", n, warmup=1)
        import time

        t = time.perf_counter()
        st()
        ref[name] = 1e3 * (time.perf_counter() - t)
    print("reference path ms (one step):", json.dumps(ref))
    np.asarray(0)
