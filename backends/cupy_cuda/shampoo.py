"""Eigenvalue-corrected Shampoo's eigenbasis moment on the CUDA backend (``shampoo.cu``): the driver of
``backends/numba_cpu/shampoo.py``. The rotations are matrix products through the namespace (cuBLAS);
one launch per block updates ``D`` in place and overwrites ``Ĝ`` with ``X``.
"""

from __future__ import annotations

import numpy as np

from ._loader import kernel_file, launch_shape, max_blocks

__all__ = ["KERNELS", "OPS", "run"]

# the eigenbasis second moment and scaled step, any β
OPS = {"shampoo_corrected": {}}
# shampoo_corrected_moment (x, d, n, decay, weight, inv_bias, eps)
KERNELS = kernel_file("shampoo.cu", ("shampoo_corrected_moment",))


def run(backend, op, params, grads, states, step, g_views=None) -> list:
    """``step`` (a ``CorrectedMomentStep``) in place on each block: ``params`` are the rotated
    blocks ``Ĝ``, ``states = [second moments D]``, ``grads`` unused. Returns the ``X`` arrays
    (``Ĝ`` itself, or its contiguous copy where ``Ĝ`` was not contiguous)."""
    rotated, moments = params, states[0]
    out = []
    for gh, d in zip(rotated, moments):
        if not getattr(gh, "is_contiguous", lambda: gh.flags.c_contiguous)():
            gh = gh.contiguous() if hasattr(gh, "contiguous") else gh.copy(order="C")
        x, dv = backend.views([gh])[0], backend.views([d])[0]
        if x.size:
            dt = x.dtype.type
            device = x.device.id
            grid, block = launch_shape(x.size, max_blocks(device))
            KERNELS.function("shampoo_corrected_moment", x.dtype, device)(
                grid, block, (x, dv, np.int64(x.size), dt(step.decay), dt(step.weight), dt(step.inv_bias),
                              dt(step.eps)))
        out.append(gh)
    return out
