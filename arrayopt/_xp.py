"""Namespace, device and dtype resolution through array-api-compat.

The namespace and device of a call are resolved once, from the parameters, and
passed down; every array an optimizer creates is created on that device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat as compat
import numpy as np

__all__ = [
    "Namespace",
    "library_of",
    "namespace_of",
    "device_of",
    "resolve",
    "state_dtype",
    "dtype_name",
    "is_low_precision",
]


def library_of(x: Any) -> str:
    """Short name of the array library of ``x`` ("numpy", "torch", ...)."""
    if compat.is_numpy_array(x):
        return "numpy"
    if compat.is_torch_array(x):
        return "torch"
    if compat.is_cupy_array(x):
        return "cupy"
    if compat.is_jax_array(x):
        return "jax"
    mod = type(x).__module__.split(".")[0]
    return mod


# memo type -> namespace module: immutable values, one dict write per type (safe under threads)
_NAMESPACE_BY_TYPE: dict = {}
_CACHEABLE = ("numpy", "torch", "cupy", "jax")


def namespace_of(x: Any):
    """The array-API namespace of one array; ``TypeError`` if ``x`` is not an array.

    For NumPy, torch, CuPy and JAX the namespace depends on the array type only and is cached.
    """
    t = type(x)
    xp = _NAMESPACE_BY_TYPE.get(t)
    if xp is not None:
        return xp
    if isinstance(x, (bool, int, float, complex)) or x is None:
        raise TypeError(f"expected an array, got a Python {t.__name__}")
    try:
        xp = compat.array_namespace(x)
    except TypeError as e:
        raise TypeError(f"expected an array, got {t.__name__} ({e})") from None
    if library_of(x) in _CACHEABLE:
        _NAMESPACE_BY_TYPE[t] = xp
    return xp


def device_of(x: Any):
    return compat.device(x)


@dataclass(frozen=True)
class Namespace:
    """What a call works with: the namespace ``xp``, the ``device`` and the library name."""

    xp: Any
    device: Any
    library: str


def resolve(leaf: Any) -> Namespace:
    """Resolve the namespace of a call from its first parameter leaf."""
    return Namespace(namespace_of(leaf), device_of(leaf), library_of(leaf))


# memo dtype -> name string: immutable values (safe under threads)
_DTYPE_NAMES: dict = {}


def dtype_name(dtype: Any) -> str:
    """A library-independent dtype name ("float32", "bfloat16", ...)."""
    key = (type(dtype), dtype)  # the type first: dtypes of different libraries never get compared
    try:
        return _DTYPE_NAMES[key]
    except (KeyError, TypeError):
        pass
    name = getattr(dtype, "name", None)  # NumPy, CuPy, JAX dtypes
    s = name if isinstance(name, str) else str(dtype)
    s = s.rsplit(".", 1)[-1].strip("')> ")
    try:
        _DTYPE_NAMES[key] = s
    except TypeError:
        pass
    return s


def is_low_precision(dtype: Any) -> bool:
    return dtype_name(dtype) in ("bfloat16", "float16")


def state_dtype(xp: Any, dtype: Any) -> Any:
    """Dtype of optimizer state and arithmetic for params of ``dtype``.

    bfloat16 and float16 params keep float32 state and compute in float32;
    float32 and float64 params compute in their own dtype.
    """
    return xp.float32 if is_low_precision(dtype) else dtype


def to_numpy(x: Any) -> np.ndarray:
    """Host NumPy copy of ``x`` (torch, CuPy, JAX, strict, NumPy)."""
    lib = library_of(x)
    if lib == "torch":
        return x.detach().cpu().numpy()
    if lib == "cupy":
        return x.get()
    if lib == "numpy":
        return np.array(x, copy=True)
    try:
        return np.asarray(x).copy()
    except Exception:  # array-api-strict and others without __array__
        return np.from_dlpack(x).copy()
