"""Math building blocks, each a pure array-API function with a test oracle.

Banded LogDet factor and apply (SONew), inverse p-th roots (Shampoo), Frequent
Directions sketches and their low-rank inverse powers (Sketchy).
"""

from __future__ import annotations

from .roots import inverse_pth_root
from .sketch import FDSketch, fd_update, lowrank_apply
from .sonew import sonew_apply, sonew_factor

__all__: list = ["sonew_factor", "sonew_apply", "inverse_pth_root", "fd_update", "lowrank_apply", "FDSketch"]
