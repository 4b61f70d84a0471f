"""Kernel table, argument typing and the lazily compiled ``cupy.RawModule``.

The kernels live in ``first_order.cu`` next to this file (see its header for the math
and the IEEE rounding rules). Everything here except :func:`module`, :func:`function`
and :func:`max_blocks` is pure Python/NumPy, so the tests check kernel names and
argument typing without CuPy or a GPU (the host harness has the kernels' exact
parameter lists).

Argument convention of every step kernel::

    (params, grads, *states, n, *scalars)

``n`` is ``numpy.int64`` (``long long``); the scalars are ``step_scalars(t, lr)`` cast
to the array's dtype (``numpy.float32`` for float32 arrays, ``numpy.float64`` for
float64), except SGD's ``nesterov`` bool, passed as ``numpy.int32`` 0/1 (C ``int``).
CuPy packs each argument by its NumPy type, so a float64 scalar given to a ``float``
parameter would be garbage: the types here are the contract.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

__all__ = [
    "SOURCE",
    "COMPILE_OPTIONS",
    "CUPY_ADDED_OPTIONS",
    "BLOCK",
    "COUNT_KERNEL",
    "KERNEL_BASES",
    "NAME_EXPRESSIONS",
    "kernel_base",
    "kernel_name",
    "kernel_args",
    "count_args",
    "launch_shape",
    "module",
    "function",
]

SOURCE = Path(__file__).with_name("first_order.cu")

# CuPy requires a -std option for `name_expressions` (templates). No fast math;
# -fmad=false forbids contracting a*b+c into an FMA (the reference rounds the product). The
# .cu also uses explicit `.rn` PTX, so results depend neither on this flag nor on the
# `-ftz=true` that CuPy appends to every compile (cupy/cupy#9576).
COMPILE_OPTIONS = ("--std=c++17", "-fmad=false")
# What CuPy adds to COMPILE_OPTIONS (the tests compile with both).
CUPY_ADDED_OPTIONS = ("-ftz=true",)

BLOCK = 256
_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# (op, number of state arrays) -> kernel template name in first_order.cu
_STEP_KERNELS = {
    ("sgd", 0): "sgd_step",
    ("sgd", 1): "sgd_momentum_step",
    ("adam", 2): "adam_step",
    ("adagrad", 1): "adagrad_step",
}
COUNT_KERNEL = "count_nonfinite"

KERNEL_BASES = tuple(sorted(set(_STEP_KERNELS.values()))) + (COUNT_KERNEL,)


def kernel_base(op: str, n_states: int) -> str:
    """Template name of the step kernel for ``op`` with ``n_states`` state arrays."""
    try:
        return _STEP_KERNELS[(op, n_states)]
    except KeyError:
        raise ValueError(f"cupy_cuda: no kernel for op {op!r} with {n_states} state arrays") from None


def kernel_name(base: str, dtype) -> str:
    """The C++ name expression of a kernel instance, e.g. ``arrayopt::adam_step<float>``."""
    try:
        ctype = _CTYPE[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TypeError(f"cupy_cuda: no kernels for dtype {dtype}") from None
    return f"arrayopt::{base}<{ctype}>"


NAME_EXPRESSIONS = tuple(kernel_name(b, t) for b in KERNEL_BASES for t in _CTYPE)


def kernel_args(p, g, states, scalars) -> tuple:
    """Arguments of a step kernel: ``(p, g, *states, int64 n, *typed scalars)``."""
    cast = np.float64 if np.dtype(p.dtype) == np.float64 else np.float32
    typed = tuple(np.int32(bool(s)) if isinstance(s, (bool, np.bool_)) else cast(s)
                  for s in scalars)
    return (p, g, *states, np.int64(p.size), *typed)


def count_args(x, counter) -> tuple:
    """Arguments of ``count_nonfinite``: ``(x, int64 n, uint64 *counter)``."""
    return (x, np.int64(x.size), counter)


def launch_shape(n: int, max_blocks: int) -> tuple:
    """``(grid, block)`` for a grid-stride loop over ``n`` elements."""
    blocks = max(1, min((n + BLOCK - 1) // BLOCK, max_blocks))
    return (blocks,), (BLOCK,)


# ---------------------------------------------------------------- CuPy (lazy)

_lock = threading.Lock()
_module = None
_functions: dict = {}
_max_blocks: dict = {}


def module():
    """The ``cupy.RawModule`` of ``first_order.cu`` (created once; CuPy compiles it with
    NVRTC on first use on each device and instantiates ``NAME_EXPRESSIONS``)."""
    global _module
    if _module is None:
        with _lock:
            if _module is None:
                import cupy

                _module = cupy.RawModule(code=SOURCE.read_text(encoding="utf-8"),
                                         options=COMPILE_OPTIONS,
                                         name_expressions=NAME_EXPRESSIONS)
    return _module


def function(base: str, dtype, device_id: int):
    """The compiled kernel ``base<dtype>`` on device ``device_id`` (cached)."""
    key = (base, np.dtype(dtype), device_id)
    f = _functions.get(key)
    if f is None:
        f = module().get_function(kernel_name(base, dtype))
        _functions[key] = f
    return f


def max_blocks(device_id: int) -> int:
    """Blocks per launch: 32 per SM, enough to fill the device; larger arrays loop."""
    n = _max_blocks.get(device_id)
    if n is None:
        import cupy

        sms = cupy.cuda.Device(device_id).attributes.get("MultiProcessorCount", 80)
        n = _max_blocks[device_id] = 32 * int(sms)
    return n
