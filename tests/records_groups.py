"""Records of per-parameter groups (``ao.partition``, ``ao.masked``): the generic tests run over them."""

from __future__ import annotations

import arrayopt as ao
from _arrays import tree_map
from records import _BAD_LR, OptimizerRecord
from records_sonew import _ATOL, _RTOL


def by_rank(params):
    """``"matrix"`` for leaves with two or more axes, ``"vector"`` for the others."""
    return tree_map(lambda p: "matrix" if len(p.shape) >= 2 else "vector", params)


def matrices(params):
    return tree_map(lambda p: len(p.shape) >= 2, params)


def sonew_on_matrices(learning_rate, band=1, on_nonfinite="raise"):
    """Tridiagonal SONew on the matrices, AdamW (no decay) on the rest."""
    return ao.partition(by_rank, {"matrix": ao.sonew(learning_rate, band=band, eps=1e-3),
                                  "vector": ao.adamw(learning_rate, weight_decay=0.0)},
                        on_nonfinite=on_nonfinite)


def scale_matrices_then_adam(learning_rate, factor=0.5, on_nonfinite="raise"):
    """A masked transform inside a chain: scale the matrices' gradients, then Adam on everything."""
    return ao.chain(ao.masked(ao.scale(factor), matrices, on_nonfinite=on_nonfinite), ao.adam(learning_rate))


RECORDS = (
    OptimizerRecord(
        "partition", sonew_on_matrices,
        configs=({"learning_rate": 0.05},),
        invalid=_BAD_LR + (({"band": -1}, ValueError, "band: must be >= 0"),),
        rtol=_RTOL, atol=_ATOL, namespace_sweep=False,
    ),
    OptimizerRecord(
        "masked", scale_matrices_then_adam,
        configs=({"learning_rate": 0.05},),
        invalid=_BAD_LR + (({"factor": float("nan")}, ValueError, "factor: must be finite"),),
        namespace_sweep=False,
    ),
)
