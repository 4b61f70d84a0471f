"""Shampoo: blocked Kronecker preconditioning, exact inverse roots, grafting,
infrequent/asynchronous host roots and roots spread over data-parallel workers.

The math, the choices and the oracles: ``docs/shampoo.md``; the optimizer:
:mod:`arrayopt.shampoo.optimizer`.
"""

from __future__ import annotations

from .async_roots import InlineExecutor
from .blocking import merge_small_dims
from ..grafting import GraftingConfig
from .config import ShampooConfig
from .distributed import LocalComm, MPIComm, TorchDistributedComm
from .factory import shampoo
from .optimizer import Shampoo, ShampooState

__all__ = ["shampoo", "Shampoo", "ShampooState", "ShampooConfig", "GraftingConfig", "InlineExecutor",
           "LocalComm", "MPIComm", "TorchDistributedComm", "merge_small_dims"]
