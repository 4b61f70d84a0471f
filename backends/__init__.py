"""Per-hardware kernels of arrayopt, imported as ``arrayopt.backends``.

- ``numba_cpu``: fused ``@njit(parallel=True)`` kernels for NumPy arrays and torch CPU tensors
  (zero-copy views), updating params and state in place.
- ``cupy_cuda``: ``.cu`` sources loaded with ``cupy.RawModule`` for CuPy arrays and torch CUDA
  tensors (DLPack, on the caller's stream).

A backend is an optimization, never a change of results: each kernel has a parity test
against the pure array-API reference in ``arrayopt``.
"""

from __future__ import annotations

from ..dispatch import register_backend
from .cupy_cuda import BACKEND as _cupy_cuda
from .numba_cpu import BACKEND as _numba_cpu

__all__ = ["available", "status"]

register_backend(_numba_cpu)
register_backend(_cupy_cuda)


def status() -> dict:
    """Each registered backend's name -> (available, reason) (``reason`` says why not, or what it
    serves), including backends added with ``arrayopt.dispatch.register_backend``."""
    from ..dispatch import backends

    return {b.name: (b.available(), b.reason()) for b in backends()}


def available() -> list:
    """Names of the registered backends that are active on this machine and not excluded by
    ``use_backend`` / ``ARRAYOPT_BACKEND`` (the reference is always there)."""
    from ..dispatch import forced_backend

    forced = forced_backend()
    if forced == "reference":
        return []
    names = [name for name, (ok, _) in status().items() if ok]
    return [n for n in names if forced is None or n == forced]
