"""Math building blocks, each a pure array-API function with a test oracle.

Banded LogDet factor and apply (SONew), inverse p-th roots (Shampoo).
"""

from __future__ import annotations

from .roots import inverse_pth_root

__all__: list = ["inverse_pth_root"]
