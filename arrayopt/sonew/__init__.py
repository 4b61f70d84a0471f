"""SONew: sparsified online Newton with diagonal, tridiagonal and banded LogDet preconditioners.

- :mod:`.optimizer`: :func:`sonew` and :class:`SONew` (init, update, the fused step);
- :mod:`.step`: :class:`SONewStep`, the frozen step description a backend reads;
- :mod:`.math`: the array-API math (``sonew_factor``, ``sonew_apply``; re-exported as
  ``arrayopt.linalg.*``).
"""

from __future__ import annotations

from .optimizer import DEFAULT_BLOCK_SIZE, SONew, sonew
from .step import SONewStep

__all__ = ["sonew", "SONew", "SONewStep", "DEFAULT_BLOCK_SIZE"]
