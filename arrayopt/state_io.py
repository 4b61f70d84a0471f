"""Save and load optimizer state exactly; measure its size.

``save_state(state, path)`` writes one ``.npz`` file: every array as raw bytes
with its dtype name and shape, and the tree (dicts with string keys, lists,
tuples, Python ints/floats/bools/strings/None) as JSON, so that
``load_state(path, like=state)`` gives back the same tree with bit-identical
arrays, the same dtypes and the same step counters, in the namespace and on the
device of ``like``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ._xp import device_of, dtype_name, library_of, namespace_of, to_numpy

__all__ = ["save_state", "load_state", "state_nbytes"]

_FORMAT = "arrayopt-state-1"
_SCALARS = (bool, int, float, str, type(None))


def _is_array(x) -> bool:
    if isinstance(x, _SCALARS) or isinstance(x, (dict, list, tuple)):
        return False
    try:
        namespace_of(x)
        return True
    except TypeError:
        return False


def _settle(state):
    """Let objects with pending work (asynchronous roots) finish before saving."""
    settle = getattr(state, "settle", None)
    if callable(settle):
        settle()


def _encode(node, path, arrays):
    if isinstance(node, dict):
        for k in node:
            if not isinstance(k, str):
                raise TypeError(f"state{path}: dict keys must be strings to be saved, got {k!r}")
        return {"dict": {k: _encode(v, f"{path}[{k!r}]", arrays) for k, v in node.items()}}
    if isinstance(node, (list, tuple)):
        kind = "list" if isinstance(node, list) else "tuple"
        return {kind: [_encode(v, f"{path}[{i}]", arrays) for i, v in enumerate(node)]}
    if isinstance(node, _SCALARS):
        return {"scalar": node, "type": type(node).__name__}
    if isinstance(node, (np.integer, np.floating, np.bool_)):
        return {"scalar": node.item(), "type": type(node.item()).__name__}
    if _is_array(node):
        host = to_numpy(node)
        name = dtype_name(node.dtype)
        key = f"a{len(arrays)}"
        arrays[key] = np.ascontiguousarray(host).view(np.uint8).reshape(-1)
        return {"array": key, "dtype": name, "shape": list(node.shape)}
    raise TypeError(f"state{path}: cannot save an object of type {type(node).__name__}")


def save_state(state: Any, path) -> None:
    """Write ``state`` to ``path`` (a ``.npz`` file) exactly."""
    _settle(state)
    arrays: dict = {}
    tree = _encode(state, "", arrays)
    meta = np.frombuffer(json.dumps({"format": _FORMAT, "tree": tree}).encode(), dtype=np.uint8)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, __meta__=meta, **arrays)
    os.replace(tmp, path)


def _np_dtype(name: str):
    if name == "bfloat16":
        try:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            return None
    return np.dtype(name)


def _to_like(raw: np.ndarray, name: str, shape, like, path):
    """Rebuild an array from raw bytes in the namespace and on the device of ``like``."""
    if like is None:
        dt = _np_dtype(name)
        if dt is None:
            raise TypeError(f"state{path}: bfloat16 array needs like= (or ml_dtypes) to load")
        return raw.view(dt).reshape(shape).copy()
    lib = library_of(like)
    if lib == "torch":
        import torch

        tdt = getattr(torch, name)
        width = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[torch.empty((), dtype=tdt).element_size()]
        t = torch.from_numpy(raw.view(width).reshape(shape).copy()).view(tdt)
        return t.to(like.device)
    dt = _np_dtype(name)
    host = raw.view(dt).reshape(shape).copy()
    if lib == "numpy":
        return host
    if lib == "jax":
        import jax

        return jax.device_put(host, device_of(like))
    if lib == "cupy":
        import cupy

        with like.device:
            return cupy.asarray(host)
    xp = namespace_of(like)
    return xp.asarray(host, device=device_of(like))


def _decode(node, like, path, data):
    if "dict" in node:
        items = node["dict"]
        if like is not None:
            if not isinstance(like, dict) or list(like.keys()) != list(items.keys()):
                raise ValueError(
                    f"state{path}: saved keys {list(items)} do not match like= keys "
                    f"{list(like) if isinstance(like, dict) else type(like).__name__}")
        return {k: _decode(v, None if like is None else like[k], f"{path}[{k!r}]", data)
                for k, v in items.items()}
    for kind, typ in (("list", list), ("tuple", tuple)):
        if kind in node:
            items = node[kind]
            if like is not None and (not isinstance(like, typ) or len(like) != len(items)):
                raise ValueError(f"state{path}: saved {kind} of {len(items)} does not match like=")
            return typ(_decode(v, None if like is None else like[i], f"{path}[{i}]", data)
                       for i, v in enumerate(items))
    if "scalar" in node:
        value = node["scalar"]
        if node["type"] == "float" and not isinstance(value, float):
            value = float(value)
        if like is not None and type(like).__name__ != node["type"]:
            raise ValueError(f"state{path}: saved a {node['type']}, like= has {type(like).__name__}")
        return value
    name, shape = node["dtype"], tuple(node["shape"])
    if like is not None:
        if not _is_array(like):
            raise ValueError(f"state{path}: saved an array, like= has {type(like).__name__}")
        if tuple(like.shape) != shape or dtype_name(like.dtype) != name:
            raise ValueError(
                f"state{path}: saved {name}{list(shape)}, like= has "
                f"{dtype_name(like.dtype)}{list(like.shape)}")
    return _to_like(data[node["array"]], name, shape, like, path)


def load_state(path, like: Any = None) -> Any:
    """Read a state written by :func:`save_state`.

    With ``like`` (a state of the same optimizer and params), the structure,
    shapes and dtypes are checked and arrays are placed in ``like``'s namespace
    and device; without it, arrays come back as NumPy arrays.
    """
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["__meta__"]).decode())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"path: {path} is not an arrayopt state file")
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
    return _decode(meta["tree"], like, "", arrays)


def state_nbytes(state: Any) -> int:
    """Bytes held by the arrays of ``state`` (Python scalars count 0)."""
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    if _is_array(state):
        n = 1
        for d in state.shape:
            n *= int(d)
        itemsize = getattr(state.dtype, "itemsize", None)
        if itemsize is None:
            itemsize = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2,
                        "bfloat16": 2, "int16": 2, "bool": 1, "int8": 1, "uint8": 1}[dtype_name(state.dtype)]
        return n * int(itemsize)
    return 0
