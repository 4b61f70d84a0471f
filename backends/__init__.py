"""Per-hardware kernels of arrayopt, imported as ``arrayopt.backends``.

- ``numba_cpu``: fused ``@njit(parallel=True)`` kernels for NumPy arrays and torch CPU tensors
  (zero-copy views), updating params and state in place.
- ``cupy_cuda``: ``.cu`` sources loaded with ``cupy.RawModule`` for CuPy arrays and torch CUDA
  tensors (DLPack, on the caller's stream).

Each backend finds its ops in its own package (one module per op, ``_optable.py``). The
registry that chooses among backends is :mod:`arrayopt.dispatch`, which imports this package
on first use and registers :data:`BUILTIN`; nothing here imports the registry.

A backend is an optimization, never a change of results: each kernel has a parity test
against the pure array-API reference in ``arrayopt``.
"""

from __future__ import annotations

from .cupy_cuda import BACKEND as _cupy_cuda
from .numba_cpu import BACKEND as _numba_cpu

__all__ = ["BUILTIN"]

#: the built-in backends, in priority order
BUILTIN = (_numba_cpu, _cupy_cuda)
