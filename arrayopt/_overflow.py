"""Overflow from finite inputs: the range a fused kernel takes, and the error of a non-finite update.

A fused kernel writes the params and the state in place in one pass, so its update is not
checked before it is written; :func:`gradients_in_range` keeps it to gradients far enough from
the dtype's largest value that no square, band product or sum of squares can overflow. Others
take the reference step, which checks the update before anything is written.
"""

from __future__ import annotations

import numpy as np

__all__ = ["IN_RANGE", "gradients_in_range", "squares_below", "nonfinite_update_error"]

#: the largest ``‖g‖²`` a fused kernel takes, relative to the dtype's largest value:
#: ``|g| < 2^-24·√max`` (float32: 1.1e12)
IN_RANGE = 2.0 ** -48


def gradients_in_range(views) -> bool:
    """``‖g‖² < 2^-48·max`` on every view (one read each); false for NaN or Inf.

    Where the backend's views answer it themselves (``views.squares_below(IN_RANGE)``;
    ``numba_cpu``: vectorised sums, the small torch leaves in one call), they do; else
    :func:`squares_below` with the dot product ``v @ v``.
    """
    below = getattr(views, "squares_below", None)
    return bool(below(IN_RANGE)) if below is not None else squares_below(views, IN_RANGE)


def squares_below(views, fraction: float, sum_squares=None) -> bool:
    """Whether every view has ``‖v‖² < fraction·max(dtype)`` (``sum_squares(v)``, default ``v @ v``);
    false for NaN or Inf."""
    for v in views:
        if v.size and not float(sum_squares(v) if sum_squares is not None else v @ v) < float(
                np.finfo(v.dtype).max) * fraction:
            return False
    return True


def nonfinite_update_error(path: str) -> ValueError:
    return ValueError(
        f"update leaf {path}: not finite (NaN or Inf) although the gradients are finite (they, or the "
        f"statistics, are too large for the dtype); the step was rejected and the state is unchanged "
        f"(pass on_nonfinite='skip' to skip such steps and count them)")
