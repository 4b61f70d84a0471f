"""First-order optimizer steps: time per step, and ratios to the bandwidth floor and to peers.

- ``Step.time_step``: ``opt.step`` for sgd (momentum 0.9), adam, adamw, adagrad ×
  backend (``numba_cpu`` fused in place, ``reference`` pure array-API) × size
  (1M, 10M float32 params in one flat array).
- ``TorchFusedAdam.time_step``: ``torch.optim.Adam(fused=True)`` on the same sizes
  (skipped without torch), the peer the Numba Adam is compared with.
- ``AdamRatios.track_ratio``: ratios measured in ONE process (``setup_cache``),
  contenders interleaved round-robin, medians over repeats
  (see ``common.measure`` and ``common.RATIOS``):

  ``numba_adam/floor``             ``ao.adam().step`` (Numba) / floor
  ``numba_kernel/floor``           the Numba Adam kernel alone (no pre-pass, no Python) / floor
  ``reference_adam/floor``         the reference path / floor
  ``torch_fused_adam/floor``       torch fused Adam / floor
  ``numba_adam/torch_fused_adam``  ``ao.adam().step`` (Numba) / torch fused Adam
  ``kernel_check/kernel_nocheck``  kernel with the finiteness pre-pass / kernel alone

  where floor = 28 B/param × n / (in-place Numba axpy bandwidth on arrays of the
  same size, measured in the same rounds).

``python asv_bench/scripts/report_ratios.py`` runs the same measurements without asv and
prints them as markdown tables.
"""

from .common import (
    BACKENDS,
    OPTIMIZERS,
    RATIOS,
    SIZES,
    OptimizerStep,
    measure,
)
from .common import TorchFusedAdam as _TorchFusedAdam


class Step:
    """Time of one ``opt.step`` (fused in place for numba_cpu; new arrays written back for reference)."""

    params = (list(OPTIMIZERS), list(BACKENDS), list(SIZES))
    param_names = ["optimizer", "backend", "size"]
    timeout = 120

    def setup(self, optimizer, backend, size):
        # allocates and fills the arrays, compiles/loads the kernels, runs 2 untimed steps
        self.stepper = OptimizerStep(optimizer, backend, SIZES[size])

    def teardown(self, optimizer, backend, size):
        del self.stepper

    def time_step(self, optimizer, backend, size):
        self.stepper()


class TorchFusedAdam:
    """Time of one ``torch.optim.Adam(fused=True).step()`` on a flat float32 CPU tensor."""

    params = (list(SIZES),)
    param_names = ["size"]
    timeout = 120

    def setup(self, size):
        self.stepper = _TorchFusedAdam(SIZES[size])  # NotImplementedError (skip) without torch

    def teardown(self, size):
        del self.stepper

    def time_step(self, size):
        self.stepper()


class AdamRatios:
    """Adam step ratios (floor, torch fused, pre-pass cost), all measured in one process."""

    params = (list(SIZES), list(RATIOS))
    param_names = ["size", "ratio"]
    unit = "ratio"
    n_rounds = 15  # interleaved rounds per size (not asv's `rounds`)
    timeout = 120

    def setup_cache(self):
        out = {}
        for size, n in SIZES.items():
            res = measure(n, rounds=self.n_rounds)
            out[size] = {"ratios": res["ratios"], "ms": res["ms"], "skipped": res["skipped"]}
        return out

    setup_cache.timeout = 300

    def setup(self, cache, size, ratio):
        if cache[size]["ratios"].get(ratio) is None:
            raise NotImplementedError(f"{ratio}: not measured ({cache[size]['skipped']})")

    def track_ratio(self, cache, size, ratio):
        return cache[size]["ratios"][ratio]
