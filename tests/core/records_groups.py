"""Records of per-parameter groups (``ao.partition``, ``ao.masked``): the generic tests run over them.

The groups hold first-order optimizers: the generic tests check the grouping (validation,
state, save/load, consumed states, zero-size leaves), and SONew on JAX would compile its
jitted step for every shape those tests draw. ``tests/test_groups.py`` runs SONew in a group.
"""

from __future__ import annotations

import arrayopt as ao
from _arrays import tree_map
from records import _BAD_LR, OptimizerRecord


def by_rank(params):
    """``"matrix"`` for leaves with two or more axes, ``"vector"`` for the others."""
    return tree_map(lambda p: "matrix" if len(p.shape) >= 2 else "vector", params)


def matrices(params):
    return tree_map(lambda p: len(p.shape) >= 2, params)


def decay_on_matrices(learning_rate, weight_decay=1e-2, on_nonfinite="raise"):
    """AdamW with decay on the matrices, SGD with momentum (no decay) on the rest."""
    return ao.partition(by_rank, {"matrix": ao.adamw(learning_rate, weight_decay=weight_decay),
                                  "vector": ao.sgd(learning_rate, momentum=0.5)},
                        on_nonfinite=on_nonfinite)


def scale_matrices_then_adam(learning_rate, factor=0.5, on_nonfinite="raise"):
    """A masked transform inside a chain: scale the matrices' gradients, then Adam on everything."""
    return ao.chain(ao.masked(ao.scale(factor), matrices, on_nonfinite=on_nonfinite), ao.adam(learning_rate))


RECORDS = (
    OptimizerRecord(
        "partition", decay_on_matrices,
        configs=({"learning_rate": 0.05},),
        invalid=_BAD_LR + (({"weight_decay": -1.0}, ValueError, "weight_decay: must be >= 0"),),
        namespace_sweep=False,
    ),
    OptimizerRecord(
        "masked", scale_matrices_then_adam,
        configs=({"learning_rate": 0.05},),
        invalid=_BAD_LR + (({"factor": float("nan")}, ValueError, "factor: must be finite"),),
        namespace_sweep=False,
    ),
)
