"""Sketchy's record for the generic tests (see tests/records.py)."""

from __future__ import annotations

import arrayopt as ao
from records import _BAD_LR, OptimizerRecord

RECORDS = (
    OptimizerRecord(
        "sketchy", ao.sketchy,
        # the first config grafts Adam's step: the default RMSProp graft has no bias correction, so its
        # first steps are ~30x the gradient and the momentum entries reach ~50, where float32 reductions
        # in another order (torch vs NumPy) move them by ~5e-6, past the bfloat16 test's atol of 1e-6
        configs=(
            {"learning_rate": 0.05, "rank": 2, "graft": "adam", "tail_decay": "sqrt"},
            {"learning_rate": 0.05, "rank": 4, "merge_small_dims": 1, "b2": 1.0, "update_every": 3,
             "start_preconditioning_step": 2, "nesterov": False, "relative_eps": False, "eps": 1e-6},
            {"learning_rate": ao.schedules.cosine_decay(0.05, 400, alpha=0.1), "rank": 1, "merge_small_dims": 1,
             "graft": "sgd", "b1": 0.5, "ema_momentum": True, "weight_decay": 1e-3,
             "skip_preconditioning_rank_lt": 2},
        ),
        invalid=_BAD_LR + (
            ({"rank": 0}, ValueError, "rank: must be >= 1"),
            ({"rank": 2.5}, TypeError, "rank: expected an integer"),
            ({"b1": 1.0}, ValueError, "b1: must be < 1"),
            ({"b2": 0.0}, ValueError, "b2: must be > 0"),
            ({"b2": 1.5}, ValueError, "b2: must be <= 1"),
            ({"eps": -1e-6}, ValueError, "eps: must be >= 0"),
            ({"relative_eps": 1}, TypeError, "relative_eps: expected a bool"),
            ({"tail_decay": "half"}, ValueError, "tail_decay: must be one of"),
            ({"update_every": 0}, ValueError, "update_every: must be >= 1"),
            ({"start_preconditioning_step": 0}, ValueError, "start_preconditioning_step: must be >= 1"),
            ({"graft": "lamb"}, ValueError, "graft: must be one of"),
            ({"graft": 3}, TypeError, "graft: expected a GraftingConfig"),
            ({"graft_b2": 1.0}, ValueError, "graft_b2: must be < 1"),
            ({"weight_decay": -1.0}, ValueError, "weight_decay: must be >= 0"),
            ({"merge_small_dims": 0}, ValueError, "merge_small_dims: must be >= 1"),
            ({"nesterov": 1}, TypeError, "nesterov: expected a bool"),
            ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite: must be one of"),
        ),
        # float32: thin SVDs from different LAPACKs (OpenBLAS, MKL, XLA) differ by rounding, amplified
        # by the inverse roots of small eigenvalues, as for Shampoo
        rtol={"float64": 1e-8, "float32": 2e-3, "bfloat16": 2e-2, "float16": 5e-3},
        atol={"float64": 1e-10, "float32": 2e-3, "bfloat16": 1e-2, "float16": 1e-3},
        converge_steps=150,
        # every drawn shape compiles anew on JAX: tests/test_sketchy_parity.py runs each namespace
        # and backend on one fixed tree instead
        namespace_sweep=False,
    ),
)
