"""Eva steps on a stack of 1024×1024 layers, and the ratio to our SGD-momentum step measured in one run.

- ``EvaStep.time_step``: ``ao.eva(variant=v).step`` with statistics for every layer, backend
  numba_cpu / reference, a stack of ``LAYERS`` float32 layers of 1024×1024 (+ bias).
- ``EvaStep.track_state_bytes``: state bytes per layer (momentum buffer + ``d_in + 1 + d_out``).
- ``EvaRatios.track_ratio``: in ONE process, contenders interleaved round-robin, ratio of
  medians (``common.interleaved``): ``eva/sgd`` and ``eva_f/sgd``, the Eva step over
  ``ao.sgd(momentum=0.9).step`` on the same tree (Numba both); target ≤ 1.3.

The Eva kernels read each gradient twice (the ``Gā`` / ``‖G‖²`` reduction, then the fused
write of ``P`` with the momentum update) where SGD reads it once: 24 against 20 B/param
plus the finiteness pre-pass both take. ``python asv_bench/benchmarks/eva.py`` prints the
figures without asv.
"""

from __future__ import annotations

import numpy as np

from .common import Stepper, ao, interleaved, medians_ms, warm_up

LAYERS = 8
WIDTH = 1024
LR = 1e-3


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    params, grads, stats = {}, {}, {}
    for i in range(LAYERS):
        w, b = f"w{i}", f"b{i}"
        params[w] = rng.standard_normal((WIDTH, WIDTH), dtype=np.float32)
        params[b] = rng.standard_normal(WIDTH, dtype=np.float32)
        grads[w] = rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) * np.float32(1e-2)
        grads[b] = rng.standard_normal(WIDTH, dtype=np.float32) * np.float32(1e-2)
        a = np.append(rng.standard_normal(WIDTH, dtype=np.float32), np.float32(1))
        stats[w] = {"a": a, "g": rng.standard_normal(WIDTH, dtype=np.float32) * np.float32(1e-3), "bias": b}
    return params, grads, stats


class TreeStepper(Stepper):
    """``opt.step`` on the layer stack (``variant`` an Eva variant, or ``"sgd"``)."""

    def __init__(self, variant: str, backend: str, warmup: int = 2):
        self.opt = ao.sgd(LR, momentum=0.9) if variant == "sgd" else ao.eva(LR, momentum=0.9, variant=variant)
        self.backend = backend
        self.p, self.g, stats = _tree()
        self.kw = {} if variant in ("sgd", "eva_s") else {"stats": stats}
        self.state = self.opt.init(self.p)
        for _ in range(warmup):
            self()

    def __call__(self):
        if self.backend == "reference":
            with ao.dispatch.use_backend("reference"):
                self.p, self.state = self.opt.step(self.p, self.g, self.state, **self.kw)
        else:
            self.p, self.state = self.opt.step(self.p, self.g, self.state, **self.kw)


class EvaStep:
    params = (["eva", "eva_f", "eva_s", "sgd"], ["numba_cpu", "reference"])
    param_names = ["variant", "backend"]
    timeout = 300

    def setup(self, variant, backend):
        warm_up()
        self.stepper = TreeStepper(variant, backend)

    def time_step(self, variant, backend):
        self.stepper()

    def track_state_bytes(self, variant, backend):
        return ao.state_nbytes(self.stepper.state) / LAYERS

    track_state_bytes.unit = "bytes per layer"


def measure_ratios(rounds: int = 15, steps: int = 2) -> dict:
    """Eva / SGD-momentum step ratios on the layer stack, all Numba, interleaved in this process."""
    warm_up()
    built = {k: TreeStepper(k, "numba_cpu") for k in ("sgd", "eva", "eva_f")}
    med = medians_ms(interleaved(built, rounds, steps))
    return {"layers": LAYERS, "width": WIDTH, "ms": med,
            "eva/sgd": med["eva"] / med["sgd"], "eva_f/sgd": med["eva_f"] / med["sgd"]}


class EvaRatios:
    timeout = 900
    params = (["eva/sgd", "eva_f/sgd"],)
    param_names = ["ratio"]

    def setup_cache(self):
        return measure_ratios()

    def track_ratio(self, cache, ratio):
        return cache[ratio]

    track_ratio.unit = "x our SGD-momentum"


if __name__ == "__main__":  # pragma: no cover
    import json
    import time

    print(json.dumps(measure_ratios(), indent=1))
    for v in ("eva", "eva_s"):
        st = TreeStepper(v, "reference", warmup=1)
        t = time.perf_counter()
        st()
        print(f"{v} reference path ms (one step): {1e3 * (time.perf_counter() - t):.1f}")
