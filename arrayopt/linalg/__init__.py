"""Math building blocks, each a pure array-API function with a test oracle.

Banded LogDet factor and apply (SONew, :mod:`arrayopt.sonew.math`), inverse p-th roots
(Shampoo, :mod:`arrayopt.linalg.roots`), Frequent Directions sketches and their low-rank
inverse powers (Sketchy, :mod:`arrayopt.sketchy.math`), Kronecker vectors,
Sherman–Morrison steps and KL step-size control (Eva, :mod:`arrayopt.eva.math`). Each
lives in its optimizer's package and is re-exported here.
"""

from __future__ import annotations

from ..eva.math import (eva_f_precondition, eva_precondition, eva_s_precondition, kl_scale, kv_conv2d, kv_grad,
                        kv_linear)
from ..sketchy.math import FDSketch, fd_update, lowrank_apply
from ..sonew.math import sonew_apply, sonew_factor
from .roots import inverse_pth_root

__all__: list = ["sonew_factor", "sonew_apply", "inverse_pth_root", "fd_update", "lowrank_apply", "FDSketch",
                  "kv_linear", "kv_conv2d", "kv_grad", "eva_precondition", "eva_f_precondition",
                  "eva_s_precondition", "kl_scale"]
