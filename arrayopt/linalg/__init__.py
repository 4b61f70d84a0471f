"""Math building blocks, each a pure array-API function with a test oracle.

Banded LogDet factor and apply (SONew), inverse p-th roots (Shampoo), Frequent
Directions sketches and their low-rank inverse powers (Sketchy), Kronecker vectors,
Sherman–Morrison steps and KL step-size control (Eva).
"""

from __future__ import annotations

from .eva import (eva_f_precondition, eva_precondition, eva_s_precondition, kl_scale, kv_conv2d, kv_grad,
                  kv_linear)
from .roots import inverse_pth_root
from .sketch import FDSketch, fd_update, lowrank_apply
from .sonew import sonew_apply, sonew_factor

__all__: list = ["sonew_factor", "sonew_apply", "inverse_pth_root", "fd_update", "lowrank_apply", "FDSketch",
                  "kv_linear", "kv_conv2d", "kv_grad", "eva_precondition", "eva_f_precondition",
                  "eva_s_precondition", "kl_scale"]
