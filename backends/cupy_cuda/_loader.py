"""The CUDA backend's one module loader: each ``.cu`` file compiled once per process and device.

An op module names its kernels with :func:`kernel_file` (its ``.cu`` beside this file and the
kernel templates it instantiates for ``float`` and ``double``); :meth:`KernelFile.function`
returns the compiled kernel ``base<dtype>`` on a device. CuPy is imported on the first launch
only, so the op table builds on machines without it; everything else here is pure
Python/NumPy, so the tests check kernel names and argument typing without a GPU.

The memos below hold one ``cupy.RawModule`` per source file (CuPy compiles it with NVRTC on
first use on each device and instantiates the name expressions), the kernel handles per
``(file, kernel, dtype, device)`` and the grid size per device: immutable values, filled under
one lock, never scratch.

Typing: CuPy packs each kernel argument by its NumPy type, so the drivers pass scalars as
:func:`scalar_type` of the array dtype (``numpy.float32`` for float32 arrays, ``numpy.float64``
for float64), flags as ``numpy.int32`` and counts as ``numpy.int64``; a float64 scalar given to a
``float`` parameter would be garbage.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["BLOCK", "COMPILE_OPTIONS", "CUPY_ADDED_OPTIONS", "KernelFile", "kernel_file", "kernel_name",
           "launch_shape", "max_blocks", "scalar_type", "source_text"]

# CuPy requires a -std option for `name_expressions` (templates). No fast math;
# -fmad=false forbids contracting a*b+c into an FMA (the reference rounds the product). The
# .cu also uses explicit `.rn` PTX, so results depend neither on this flag nor on the
# `-ftz=true` that CuPy appends to every compile (cupy/cupy#9576).
COMPILE_OPTIONS = ("--std=c++17", "-fmad=false")
# What CuPy adds to COMPILE_OPTIONS (the tests compile with both).
CUPY_ADDED_OPTIONS = ("-ftz=true",)

# threads per block of the grid-stride kernels
BLOCK = 256
_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_INCLUDE = re.compile(r'^#include "([\w.]+\.cuh)"[ \t]*$', re.M)


def kernel_name(base: str, dtype) -> str:
    """The C++ name expression of a kernel instance, e.g. ``arrayopt::adam_step<float>``."""
    try:
        ctype = _CTYPE[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TypeError(f"cupy_cuda: no kernels for dtype {dtype}") from None
    return f"arrayopt::{base}<{ctype}>"


def scalar_type(dtype):
    """The NumPy scalar type of a kernel's ``T`` parameters for arrays of ``dtype``."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def source_text(path) -> str:
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


_lock = threading.RLock()
_modules: dict = {}
_functions: dict = {}
_max_blocks: dict = {}


class KernelFile(NamedTuple):
    """One ``.cu`` file (``path``) and the kernel templates it instantiates (``bases``)."""

    path: Path
    bases: tuple

    @property
    def name_expressions(self) -> tuple:
        """Every kernel of the file for float and double, as CuPy's ``name_expressions``."""
        return tuple(kernel_name(b, t) for b in self.bases for t in _CTYPE)

    def module(self):
        """The file's ``cupy.RawModule`` (created once per process)."""
        mod = _modules.get(self.path)
        if mod is None:
            with _lock:
                mod = _modules.get(self.path)
                if mod is None:
                    import cupy

                    mod = cupy.RawModule(code=source_text(self.path), options=COMPILE_OPTIONS,
                                         name_expressions=self.name_expressions)
                    _modules[self.path] = mod
        return mod

    def function(self, base: str, dtype, device_id: int):
        """The compiled kernel ``base<dtype>`` on device ``device_id`` (the current device),
        compiled on first use on that device."""
        key = (self.path, base, np.dtype(dtype), device_id)
        f = _functions.get(key)
        if f is None:
            if base not in self.bases:
                raise ValueError(f"cupy_cuda: {self.path.name} has no kernel {base!r}")
            with _lock:
                f = _functions.get(key)
                if f is None:
                    f = _functions[key] = self.module().get_function(kernel_name(base, dtype))
        return f


def kernel_file(name: str, bases) -> KernelFile:
    """The :class:`KernelFile` of ``name`` (a ``.cu`` file of this package) with kernels ``bases``."""
    return KernelFile(Path(__file__).with_name(name), tuple(bases))


def launch_shape(n: int, max_blocks: int) -> tuple:
    """``(grid, block)`` for a grid-stride loop over ``n`` elements."""
    blocks = max(1, min((n + BLOCK - 1) // BLOCK, max_blocks))
    return (blocks,), (BLOCK,)


def max_blocks(device_id: int) -> int:
    """Blocks per launch: 32 per SM, enough to fill the device; larger arrays loop."""
    n = _max_blocks.get(device_id)
    if n is None:
        import cupy

        sms = cupy.cuda.Device(device_id).attributes.get("MultiProcessorCount", 80)
        n = _max_blocks[device_id] = 32 * int(sms)
    return n
