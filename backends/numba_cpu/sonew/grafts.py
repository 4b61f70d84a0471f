"""SONew's graft codes as module-level integers, read by the kernels as compile-time constants.

The codes are :data:`arrayopt.sonew.step.GRAFT_CODES` (what ``SONewStep.graft_code`` returns);
Numba freezes a module-level integer into the machine code, so ``graft == GRAFT_ADAM`` costs
what a literal does.
"""

from __future__ import annotations

from arrayopt.sonew.step import GRAFT_CODES

__all__ = ["GRAFT_NONE", "GRAFT_ADAM", "GRAFT_SGD", "GRAFT_MOMENTUM", "GRAFT_RMSPROP_NORMALIZED"]

GRAFT_NONE = GRAFT_CODES["none"]
GRAFT_ADAM = GRAFT_CODES["adam"]
GRAFT_SGD = GRAFT_CODES["sgd"]
GRAFT_MOMENTUM = GRAFT_CODES["momentum"]
GRAFT_RMSPROP_NORMALIZED = GRAFT_CODES["rmsprop_normalized"]
