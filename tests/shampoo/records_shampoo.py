"""Shampoo's record for the generic tests (see tests/records.py)."""

from __future__ import annotations

import arrayopt as ao
from records import _BAD_LR, OptimizerRecord

RECORDS = (
    OptimizerRecord(
        "shampoo", ao.shampoo,
        configs=(
            {"learning_rate": 0.05, "block_size": 3},
            {"learning_rate": 0.05, "block_size": 3, "graft": "rmsprop_normalized", "b2": 0.9},
            {"learning_rate": 0.05, "block_size": 8, "b2": 1.0, "graft": "adagrad", "precondition_every": 3,
             "start_preconditioning_step": 2, "nesterov": False},
            {"learning_rate": 0.05, "block_size": 2, "graft": "adam", "weight_decay": 1e-3, "ema_momentum": True,
             "b1": 0.5, "exponent_override": 4},
            {"learning_rate": 0.1, "block_size": 4, "graft": "sgd", "b1": 0.0, "root_method": "newton"},
            {"learning_rate": ao.schedules.cosine_decay(0.05, 400, alpha=0.1), "block_size": 16,
             "graft": "rmsprop", "preconditioner_type": "input"},
            # ε well above the rounding noise of the rotation: early factors are rank-deficient, and on a
            # null direction Ĝ is exactly 0 in one namespace and up to k·u₃₂·‖G‖ ≈ 2e-6 (float32, k = 3,
            # ‖G‖ ≈ 10) in another, which Ĝ/(√D + ε) turns into 2e-6/ε: an O(1) difference at ε = 1e-8,
            # 0.0027 at ε = 1e-4 (hypothesis found it: (3, 6) float32, seed 2131), under the 2e-3
            # tolerance at ε = 1e-2 (Adam in a rotated basis, SOAP alike)
            {"learning_rate": 0.05, "block_size": 3, "preconditioner": "eigenvalue_corrected", "root_method": "qr",
             "b2": 0.95, "eps": 1e-2, "precondition_every": 2, "weight_decay": 1e-3},
        ),
        invalid=_BAD_LR + (
            ({"block_size": 0}, ValueError, "block_size: must be >= 1"),
            ({"block_size": 2.5}, TypeError, "block_size: expected an integer"),
            ({"b1": 1.0}, ValueError, "b1: must be < 1"),
            ({"b2": 0.0}, ValueError, "b2: must be > 0"),
            ({"b2": 1.5}, ValueError, "b2: must be <= 1"),
            ({"eps": -1e-6}, ValueError, "eps: must be > 0"),
            ({"eps": 0.0}, ValueError, "eps: must be > 0"),  # every root would fail
            ({"precondition_every": 0}, ValueError, "precondition_every: must be >= 1"),
            ({"start_preconditioning_step": 0}, ValueError, "start_preconditioning_step: must be >= 1"),
            ({"root_method": "svd"}, ValueError, "root_method: must be one of"),
            ({"graft": "lamb"}, ValueError, "graft: must be one of"),
            ({"graft": 3}, TypeError, "graft: expected a GraftingConfig"),
            ({"graft_b2": 1.0}, ValueError, "graft_b2: must be < 1"),
            ({"graft_eps": -1.0}, ValueError, "graft_eps: must be >= 0"),
            ({"exponent_override": -2}, ValueError, "exponent_override: must be >= 0"),
            ({"weight_decay": -1.0}, ValueError, "weight_decay: must be >= 0"),
            ({"preconditioner_type": "left"}, ValueError, "preconditioner_type: must be one of"),
            ({"root_dtype": "float16"}, ValueError, "root_dtype: must be one of"),
            ({"nesterov": 1}, TypeError, "nesterov: expected a bool"),
            ({"executor": object()}, TypeError, "executor: expected a concurrent.futures.Executor"),
            ({"comm": object()}, TypeError, "comm: expected a communicator"),
            ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite: must be one of"),
            ({"preconditioner": "eigen"}, ValueError, "preconditioner: must be one of"),
            ({"preconditioner": "eigenvalue_corrected", "root_method": "newton"}, ValueError,
             "root_method: 'newton' computes inverse roots"),
            ({"preconditioner": "eigenvalue_corrected", "exponent_override": 2}, ValueError,
             "exponent_override: preconditioner='eigenvalue_corrected'"),
            ({"qr_iterations": 0}, ValueError, "qr_iterations: must be >= 1"),
            ({"qr_tolerance": -0.1}, ValueError, "qr_tolerance: must be >= 0"),
            ({"eigen_b2": 0.0}, ValueError, "eigen_b2: must be > 0"),
        ),
        # float32: statistics summed by different BLAS (OpenBLAS vs MKL) differ by rounding, and the
        # inverse 4th roots amplify that by up to κ^(1/4) of each factor (momentum entries up to ~8
        # differ by ~1e-4 relative to the largest entry between torch and NumPy)
        rtol={"float64": 1e-9, "float32": 2e-3, "bfloat16": 2e-2, "float16": 5e-3},
        atol={"float64": 1e-11, "float32": 2e-3, "bfloat16": 1e-2, "float16": 1e-3},
        converge_steps=300,
    ),
)
