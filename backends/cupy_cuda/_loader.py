"""Kernel table, argument typing and the lazily compiled ``cupy.RawModule`` objects.

The kernels live in ``first_order.cu``, ``sonew.cu``, ``eva.cu``, ``sketchy.cu`` and ``shampoo.cu`` next to this file (see their
headers for the math; the IEEE rounding helpers they share are in ``rn_ops.cuh``, which
:func:`source_text` inlines into the source handed to NVRTC). Everything here except :func:`module`, :func:`function`
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

import math
import re
import threading
from pathlib import Path

import numpy as np

__all__ = [
    "SOURCE",
    "SONEW_SOURCE",
    "SONEW_KERNEL_BASES",
    "SONEW_NAME_EXPRESSIONS",
    "SONEW_MAX_BAND",
    "EVA_SOURCE",
    "EVA_KERNEL_BASES",
    "EVA_NAME_EXPRESSIONS",
    "eva_module",
    "SKETCHY_SOURCE",
    "SKETCHY_KERNEL_BASES",
    "SKETCHY_NAME_EXPRESSIONS",
    "sketchy_module",
    "SHAMPOO_SOURCE",
    "SHAMPOO_KERNEL_BASES",
    "SHAMPOO_NAME_EXPRESSIONS",
    "shampoo_module",
    "source_text",
    "sonew_factor_kernel",
    "sonew_launches",
    "sonew_block_launch",
    "sonew_module",
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
SONEW_SOURCE = Path(__file__).with_name("sonew.cu")
EVA_SOURCE = Path(__file__).with_name("eva.cu")
SKETCHY_SOURCE = Path(__file__).with_name("sketchy.cu")
SHAMPOO_SOURCE = Path(__file__).with_name("shampoo.cu")

_INCLUDE = re.compile(r'^#include "([\w.]+\.cuh)"[ \t]*$', re.M)


def source_text(path=SOURCE) -> str:
    """The text of a ``.cu`` file with its local ``#include "x.cuh"`` lines replaced by the
    headers' text, recursively, each header once (as its include guard would): what NVRTC
    compiles (no include path needed, and CuPy's kernel cache, keyed by the source text, sees
    header changes)."""
    path = Path(path)
    seen: set = set()

    def inline(m) -> str:
        name = m.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return _INCLUDE.sub(inline, path.with_name(name).read_text(encoding="utf-8"))

    return _INCLUDE.sub(inline, path.read_text(encoding="utf-8"))


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

# eva.cu: eva_row_reduce (G, a, rows, n, rowdot, rowsq) and
# eva_apply (p, G, buf, a, coef, rows, n, scale, lr, mu, wd, int nesterov, int use_buf)
EVA_KERNEL_BASES = ("eva_row_reduce", "eva_apply")
EVA_NAME_EXPRESSIONS = tuple(kernel_name(b, t) for b in EVA_KERNEL_BASES for t in _CTYPE)

# sketchy.cu: sketchy_norms (g, acc, d, n, int kind, b2, omb2, eps, bc2s, double* part_a, double* part_d)
# and sketchy_write (p, g, acc, d, m, n, int kind, int precond, scale, b2, omb2, eps, bc2s, b1, w1,
# int nesterov, int use_m, wd, lr)
SKETCHY_KERNEL_BASES = ("sketchy_norms", "sketchy_write")
SKETCHY_NAME_EXPRESSIONS = tuple(kernel_name(b, t) for b in SKETCHY_KERNEL_BASES for t in _CTYPE)

# shampoo.cu: shampoo_corrected_moment (x, d, n, decay, weight, inv_bias, eps)
SHAMPOO_KERNEL_BASES = ("shampoo_corrected_moment",)
SHAMPOO_NAME_EXPRESSIONS = tuple(kernel_name(b, t) for b in SHAMPOO_KERNEL_BASES for t in _CTYPE)


def kernel_args(p, g, states, scalars) -> tuple:
    """Arguments of a step kernel: ``(p, g, *states, int64 n, *typed scalars)``."""
    cast = np.float64 if np.dtype(p.dtype) == np.float64 else np.float32
    typed = tuple(np.int32(bool(s)) if isinstance(s, (bool, np.bool_)) else cast(s)
                  for s in scalars)
    return (p, g, *states, np.int64(p.size), *typed)


def count_args(x, counter) -> tuple:
    """Arguments of ``count_nonfinite``: ``(x, int64 n, uint64 *counter)``."""
    return (x, np.int64(x.size), counter)


# ---------------------------------------------------------------- SONew (sonew.cu)

SONEW_EXACT_BANDS = range(2, 9)  # sonew_band_factor_b<B>: b fixed at compile time
SONEW_KERNEL_BASES = ("sonew_stats", "sonew_rowmax", "sonew_tri_precond", "sonew_band_factor_8",
                      "sonew_band_factor_32", "sonew_band_apply", "sonew_scaled_apply",
                      *(f"sonew_band_factor_b{b}" for b in SONEW_EXACT_BANDS),
                      "sonew_block_step_8", "sonew_block_step_32")
SONEW_NAME_EXPRESSIONS = tuple(kernel_name(b, t) for b in SONEW_KERNEL_BASES for t in _CTYPE)
# the widest band the kernels take (per-thread window arrays); wider bands take the reference
SONEW_MAX_BAND = 32
SONEW_GRAFT_CODES = {"none": 0, "adam": 1, "sgd": 2, "momentum": 3, "rmsprop_normalized": 4}
# threads per block of the block-local kernel (one thread block per SONew block)
SONEW_BLOCK_THREADS = 256


def sonew_factor_kernel(b: int) -> str:
    """The banded factor kernel for half-bandwidth ``b``: ``b`` fixed at compile time for
    2..8 (window in registers), else a runtime ``b`` in window arrays of 8 or 32."""
    if b in SONEW_EXACT_BANDS:
        return f"sonew_band_factor_b{b}"
    if b <= 8:
        return "sonew_band_factor_8"
    if b <= SONEW_MAX_BAND:
        return "sonew_band_factor_32"
    raise ValueError(f"cupy_cuda: SONew kernels take band <= {SONEW_MAX_BAND}, got {b}")


def is_sonew_band(a, p) -> bool:
    """``a`` has the shape of SONew's band state for param ``p``: ``(p.size, b+1)``, b <= max."""
    shape = tuple(a.shape)
    return (len(shape) == 2 and shape[0] == math.prod(tuple(p.shape))
            and 1 <= shape[1] <= SONEW_MAX_BAND + 1)


def sonew_launches(step, p, g, m, band, b, norms, counts, rowmax, u=None, psi=None, t=None) -> list:
    """The kernel launches ``[(base, args)]`` of one SONew step on one leaf.

    ``step``: the frozen ``arrayopt.sonew.step.SONewStep`` (hyperparameters, ``lr``,
    ``bc1``, ``bc2``). ``p, g, m, band`` are flat views (``band`` of ``n*(b+1)`` entries);
    ``norms`` (float64, 2), ``counts`` (uint64, 2) and ``rowmax`` (param dtype, 1) are zeroed
    device scratch; ``u`` (n) is needed with a graft, ``psi`` (n*b) and ``t`` (n) when
    ``b != 1``. Scalars are typed as the param dtype (the Numba backend's casts), flags and
    ``b`` as int32, ``n`` as int64.
    """
    cast = np.float64 if np.dtype(p.dtype) == np.float64 else np.float32
    n, bi = np.int64(p.size), np.int32(b)
    graft = SONEW_GRAFT_CODES[step.graft]
    cbc1, cbc2 = cast(step.bc1), cast(step.bc2)
    launches = [("sonew_stats", (g, m, band, n, bi, cast(step.omb1), cast(step.b2),
                                 cast(step.omb2), cbc1, cbc2, cast(step.graft_eps),
                                 np.int32(graft), norms))]
    if step.relative_eps:
        launches.append(("sonew_rowmax", (band, n, bi, cbc2, rowmax)))
    # ε_eff = max(ε·rowmax, ε_min) (relative) or ε, evaluated on the device from these
    eps_args = (rowmax, cast(step.eps), cast(step.eps_min), np.int32(bool(step.relative_eps)),
                cast(step.tau(np.dtype(p.dtype))))
    write_p = graft == 0
    out = p if write_p else u
    neg_lr, wd, wp = cast(-step.lr), cast(step.weight_decay), np.int32(write_p)
    if b == 1:
        launches.append(("sonew_tri_precond", (p, m, band, out, n, cbc1, cbc2, *eps_args,
                                               neg_lr, wd, wp, norms, counts)))
    else:
        launches.append((sonew_factor_kernel(b), (m, band, psi, t, n, bi, cbc1, cbc2, *eps_args,
                                                  counts)))
        launches.append(("sonew_band_apply", (p, psi, t, out, n, bi, neg_lr, wd, wp, norms)))
    if not write_p:
        launches.append(("sonew_scaled_apply", (p, u, n, norms, neg_lr, wd)))
    return launches


def sonew_block_launch(step, p, g, m, band, nu, b, counts, psi, t, u, small) -> tuple:
    """``(base, grid, block, args)`` of block-local SONew (``step.block_size``) on one leaf.

    One thread block of ``SONEW_BLOCK_THREADS`` per SONew block (``sonew_block_step_8`` for
    ``b <= 8``, ``_32`` up to 32); ``nu`` is the rmsprop_normalized accumulator (a 1-entry
    dummy otherwise), ``psi`` (n·b, at least 1), ``t`` and ``u`` (n) scratch; ``small``: the
    leaf has ``ndim <= 1`` (``small_param_fallback``).
    """
    cast = np.float64 if np.dtype(p.dtype) == np.float64 else np.float32
    n = int(p.size)
    bsz = max(1, min(int(step.block_size), n))
    base = "sonew_block_step_8" if b <= 8 else "sonew_block_step_32"
    if b > SONEW_MAX_BAND:
        raise ValueError(f"cupy_cuda: SONew kernels take band <= {SONEW_MAX_BAND}, got {b}")
    args = (p, g, m, band, nu, psi, t, u, np.int64(n), np.int32(b), np.int64(bsz), cast(step.omb1),
            cast(step.b2), cast(step.omb2), cast(step.bc1), cast(step.bc2), cast(step.graft_eps),
            np.int32(SONEW_GRAFT_CODES[step.graft]), cast(step.eps), cast(step.eps_min),
            np.int32(bool(step.relative_eps)), cast(step.tau(np.dtype(p.dtype))), cast(-step.lr),
            cast(step.weight_decay), np.int32(bool(small and step.small_param_fallback == "adam")), counts)
    return base, ((n + bsz - 1) // bsz,), (SONEW_BLOCK_THREADS,), args


def launch_shape(n: int, max_blocks: int) -> tuple:
    """``(grid, block)`` for a grid-stride loop over ``n`` elements."""
    blocks = max(1, min((n + BLOCK - 1) // BLOCK, max_blocks))
    return (blocks,), (BLOCK,)


# ---------------------------------------------------------------- CuPy (lazy)

_lock = threading.Lock()
# memos of compiled modules (by source file), kernel handles and per-device grid sizes:
# immutable values, never scratch; a race builds a handle twice and keeps one (safe under threads)
_modules: dict = {}
_functions: dict = {}
_max_blocks: dict = {}


def _raw_module(source, name_expressions):
    """The ``cupy.RawModule`` of one ``.cu`` file (created once; CuPy compiles it with NVRTC on
    first use on each device and instantiates ``name_expressions``)."""
    mod = _modules.get(source)
    if mod is None:
        with _lock:
            mod = _modules.get(source)
            if mod is None:
                import cupy

                mod = cupy.RawModule(code=source_text(source), options=COMPILE_OPTIONS,
                                     name_expressions=name_expressions)
                _modules[source] = mod
    return mod


def module():
    """The module of ``first_order.cu``."""
    return _raw_module(SOURCE, NAME_EXPRESSIONS)


def sonew_module():
    """The module of ``sonew.cu``."""
    return _raw_module(SONEW_SOURCE, SONEW_NAME_EXPRESSIONS)


def eva_module():
    """The module of ``eva.cu``."""
    return _raw_module(EVA_SOURCE, EVA_NAME_EXPRESSIONS)


def sketchy_module():
    """The module of ``sketchy.cu``."""
    return _raw_module(SKETCHY_SOURCE, SKETCHY_NAME_EXPRESSIONS)


def shampoo_module():
    """The module of ``shampoo.cu``."""
    return _raw_module(SHAMPOO_SOURCE, SHAMPOO_NAME_EXPRESSIONS)


def function(base: str, dtype, device_id: int):
    """The compiled kernel ``base<dtype>`` on device ``device_id`` (cached)."""
    key = (base, np.dtype(dtype), device_id)
    f = _functions.get(key)
    if f is None:
        mod = (sonew_module() if base in SONEW_KERNEL_BASES else
               eva_module() if base in EVA_KERNEL_BASES else
               sketchy_module() if base in SKETCHY_KERNEL_BASES else
               shampoo_module() if base in SHAMPOO_KERNEL_BASES else module())
        f = mod.get_function(kernel_name(base, dtype))
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
