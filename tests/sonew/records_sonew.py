"""Records of SONew (diagonal, tridiagonal, band-4): the generic tests run over them."""

from __future__ import annotations

import arrayopt as ao
from records import _BAD_LR, OptimizerRecord

_INVALID = _BAD_LR + (
    ({"band": -1}, ValueError, "band: must be >= 0"),
    ({"band": 1.5}, TypeError, "band: expected an integer"),
    ({"b1": 1.0}, ValueError, "b1: must be < 1"),
    ({"b2": -0.1}, ValueError, "b2: must be >= 0"),
    ({"eps": -1e-6}, ValueError, "eps: must be >= 0"),
    ({"eps": 0.0, "relative_eps": False}, ValueError, "eps: must be > 0"),
    ({"graft": "shampoo"}, ValueError, "graft: must be one of"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay: must be >= 0"),
    ({"graft_eps": float("nan")}, ValueError, "graft_eps: must be finite"),
    ({"relative_eps": 1}, TypeError, "relative_eps: expected a bool"),
    ({"tau_factor": -1.0}, ValueError, "tau_factor: must be >= 0"),
    ({"flatten_order": "K"}, ValueError, "flatten_order: must be one of"),
    ({"block_size": 0}, ValueError, "block_size: must be >= 1"),
    ({"small_param_fallback": "sgd"}, ValueError, "small_param_fallback: must be one of"),
    ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite: must be one of"),
)

# f32 tolerances: the band solve amplifies rounding by up to κ(X) ≲ 1/eps_rel (here 1e-3 or so)
_RTOL = {"float64": 1e-9, "float32": 2e-4, "bfloat16": 2e-2, "float16": 5e-3}
_ATOL = {"float64": 1e-12, "float32": 2e-5, "bfloat16": 1e-2, "float16": 1e-3}

RECORDS = (
    OptimizerRecord(
        "sonew_tridiag", ao.sonew,
        configs=(
            {"learning_rate": 0.05, "band": 1, "eps": 1e-3},
            {"learning_rate": 0.02, "band": 1, "eps": 1e-2, "graft": "none", "b1": 0.5, "b2": 0.9,
             "weight_decay": 1e-3},
            {"learning_rate": 0.05, "band": 1, "eps": 1e-3, "graft": "momentum", "relative_eps": False},
        ),
        invalid=_INVALID, rtol=_RTOL, atol=_ATOL,
    ),
    OptimizerRecord(
        "sonew_diag", ao.sonew,
        configs=(
            {"learning_rate": 0.05, "band": 0, "eps": 1e-3},
            {"learning_rate": 0.05, "band": 0, "eps": 1e-3, "graft": "sgd"},
        ),
        invalid=_INVALID, rtol=_RTOL, atol=_ATOL,
    ),
    OptimizerRecord(
        "sonew_band4", ao.sonew,
        configs=(
            {"learning_rate": 0.05, "band": 4, "eps": 1e-3},
            {"learning_rate": ao.schedules.cosine_decay(0.05, 300, alpha=0.01), "band": 3, "eps": 1e-2,
             "graft": "rmsprop_normalized",
             "small_param_fallback": "adam", "flatten_order": "F"},
            {"learning_rate": 0.05, "band": 2, "eps": 1e-2, "block_size": 5, "weight_decay": 1e-2},
        ),
        invalid=_INVALID, rtol=_RTOL, atol=_ATOL,
    ),
)
