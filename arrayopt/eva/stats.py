"""The per-layer statistics Eva and Eva-f take (``stats=``): resolving a layer's key to its
weight leaf, unpacking its entry (``a``/``g`` vectors or raw ``input``/``output_grad``
batches), reducing raw batches to the Kronecker vectors ``ā``, ``ḡ`` and checking each
vector's namespace, device, length and dtype with a named error."""

from __future__ import annotations

from .._xp import device_of

__all__ = ["STAT_KEYS", "Shape", "resolve", "unpack", "reduce_raw", "check_vector"]

STAT_KEYS = ("a", "g", "bias", "input", "output_grad")


class Shape:
    """A stand-in with only a ``shape``: checks a state array against an expected shape."""

    def __init__(self, shape):
        self.shape = shape


def resolve(key, index, where):
    """The leaf path a stats key names: the path itself, or the key of a top-level dict entry."""
    if isinstance(key, str) and key in index:
        return key
    path = f"[{key!r}]"
    if path in index:
        return path
    known = list(index)
    raise ValueError(f"{where}: names no params leaf (leaves: {known[:6]}{'...' if len(known) > 6 else ''})")


def unpack(value, where):
    """``(a, g, bias, input, output_grad)`` of one stats entry."""
    if isinstance(value, dict):
        extra = set(value) - set(STAT_KEYS)
        if extra:
            raise ValueError(f"{where}: unknown entries {sorted(extra)}; expected {list(STAT_KEYS)}")
        for vec, raw in (("a", "input"), ("g", "output_grad")):
            if vec in value and raw in value:
                raise ValueError(f"{where}: give either {vec!r} (the reduced vector) or {raw!r} (the raw "
                                 f"tensor), not both")
        return (value.get("a"), value.get("g"), value.get("bias"), value.get("input"),
                value.get("output_grad"))
    if isinstance(value, (tuple, list)) and len(value) in (1, 2):
        return value[0], (value[1] if len(value) == 2 else None), None, None, None
    raise TypeError(f"{where}: expected {{'a': ..., 'g': ..., 'bias': ...}} or a tuple (a, g), "
                    f"got {type(value).__name__}")


def reduce_raw(ns, where, a, g, raw_in, raw_out, has_bias, d_in, d_out):
    """Raw tensors of a linear layer reduced to its Kronecker vectors (E1): ``input`` (``(..., d_in)``)
    by :func:`~arrayopt.linalg.kv_linear`, ``output_grad`` (``(..., d_out)``) by
    :func:`~arrayopt.linalg.kv_grad` over every axis but the last. Convolutions pass the vectors of
    :func:`~arrayopt.linalg.kv_conv2d` instead (the reduction needs the kernel's geometry)."""
    from .._validate import _leaf_namespace
    from .math import kv_grad, kv_linear

    for name, raw, n, what in (("input", raw_in, d_in, "d_in"), ("output_grad", raw_out, d_out, "d_out")):
        if raw is None:
            continue
        if _leaf_namespace(f"{where}[{name!r}]", "", raw) is not ns.xp:
            raise TypeError(f"{where}[{name!r}]: array namespace differs from the params namespace {ns.library}")
        if len(raw.shape) < 1 or int(raw.shape[-1]) != n:
            raise ValueError(f"{where}[{name!r}]: shape {tuple(raw.shape)}, expected (..., {n}) with the "
                             f"feature axis last ({what} of a linear layer; convolutions pass the vectors "
                             f"of arrayopt.linalg.kv_conv2d / kv_grad)")
    if raw_in is not None:
        a = kv_linear(raw_in, has_bias=has_bias)
    if raw_out is not None:
        g = kv_grad(raw_out)
    return a, g


def check_vector(ns, where, v, n, what):
    from .._validate import _leaf_namespace
    from .._xp import dtype_name, library_of

    if v is None:
        raise ValueError(f"{where}: missing")
    xp = _leaf_namespace(where, "", v)
    if xp is not ns.xp:
        raise TypeError(f"{where}: array namespace {library_of(v)} differs from params namespace {ns.library}")
    if device_of(v) != ns.device:
        raise ValueError(f"{where}: device {device_of(v)} differs from params device {ns.device}")
    if dtype_name(v.dtype) not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"{where}: dtype {dtype_name(v.dtype)} is not a real floating dtype")
    if tuple(v.shape) != (n,):
        raise ValueError(f"{where}: shape {tuple(v.shape)}, expected ({n},) = {what}; raw layer inputs and "
                         f"output gradients are reduced by arrayopt.linalg.kv_linear / kv_conv2d / kv_grad")
    return v
