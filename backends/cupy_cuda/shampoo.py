"""Eigenvalue-corrected Shampoo's eigenbasis moment on the CUDA backend (``shampoo.cu``): the driver of
``backends/numba_cpu/shampoo.py``. The rotations are matrix products through the namespace (cuBLAS);
one launch per block updates ``D`` in place and overwrites ``Ĝ`` with ``X``.
"""

from __future__ import annotations

from . import _loader

__all__ = ["run"]


def run(backend, step, rotated, moments) -> list:
    """``step`` (a ``CorrectedMomentStep``) on each block in place; returns the ``X`` arrays (``Ĝ``
    itself, or its contiguous copy where ``Ĝ`` was not contiguous)."""
    import numpy as np

    out = []
    for gh, d in zip(rotated, moments):
        if not getattr(gh, "is_contiguous", lambda: gh.flags.c_contiguous)():
            gh = gh.contiguous() if hasattr(gh, "contiguous") else gh.copy(order="C")
        x, dv = backend.views([gh])[0], backend.views([d])[0]
        if x.size:
            dt = x.dtype.type
            device = x.device.id
            grid, block = _loader.launch_shape(x.size, _loader.max_blocks(device))
            _loader.function("shampoo_corrected_moment", x.dtype, device)(
                grid, block, (x, dv, np.int64(x.size), dt(step.decay), dt(step.weight), dt(step.inv_bias),
                              dt(step.eps)))
        out.append(gh)
    return out
