"""Save and load optimizer state exactly; measure its size.

``save_state(state, path)`` writes one ``.npz`` file: every array as raw bytes
with its dtype name and shape, and the tree (dicts with string keys, lists,
tuples, Python ints/floats/bools/strings/None) as JSON, so that
``load_state(path, like=state)`` gives back the same tree with bit-identical
arrays, the same dtypes and the same step counters, in the namespace and on the
device of ``like``.

The JSON header records the format name and version (:data:`FORMAT`,
:data:`VERSION`) and the params leaf paths the state was made for, so loading
with ``like=`` a state of a renamed params tree is caught. Before writing,
pending work anywhere in the tree is settled (asynchronous Shampoo roots, also
inside :func:`arrayopt.chain`); a state that ``update``/``step`` already
consumed is refused. The file is written to ``<path>.tmp`` and renamed over
``path``, so a failed save leaves the old file intact and no ``.tmp`` behind.
A file that is empty, truncated, corrupted or not an arrayopt state raises a
``ValueError`` naming the path and the problem.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from typing import Any

import numpy as np

from ._state_use import fresh_tokens, is_consumed
from ._xp import device_of, dtype_name, library_of, namespace_of, to_numpy

__all__ = ["save_state", "load_state", "state_nbytes", "FORMAT", "VERSION"]

FORMAT = "arrayopt-state"
VERSION = 2
_SCALARS = (bool, int, float, str, type(None))
_MALFORMED = (KeyError, TypeError, IndexError, AttributeError)


def _is_array(x) -> bool:
    if isinstance(x, _SCALARS) or isinstance(x, (dict, list, tuple)):
        return False
    try:
        namespace_of(x)
        return True
    except TypeError:
        return False


def _settle(node) -> None:
    """Let every object in the tree with pending work (asynchronous roots) finish before saving."""
    if isinstance(node, dict):
        settle = getattr(node, "settle", None)
        if callable(settle):
            settle()
        for v in node.values():
            _settle(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _settle(v)


def _check_not_consumed(node, path="") -> None:
    """Refuse a state (or a nested one, e.g. in a chain) that update()/step() already consumed."""
    if isinstance(node, dict):
        if "optimizer" in node and is_consumed(node):  # also a shallow copy of a consumed state
            raise ValueError(
                f"state{path}: already consumed by update()/step() (fused kernels may have reused its "
                f"buffers); save the state that call returned")
        for k, v in node.items():
            _check_not_consumed(v, f"{path}[{k!r}]")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_not_consumed(v, f"{path}[{i}]")


def _param_paths(state) -> list | None:
    pp = state.get("param_paths") if isinstance(state, dict) else None
    return list(pp) if isinstance(pp, (list, tuple)) else None


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
    """Write ``state`` to ``path`` (a ``.npz`` file) exactly.

    Settles pending work first; refuses a consumed state. On failure the old file at
    ``path`` (if any) is untouched and ``<path>.tmp`` is removed.
    """
    _check_not_consumed(state)
    _settle(state)
    arrays: dict = {}
    tree = _encode(state, "", arrays)
    header = {"format": FORMAT, "version": VERSION, "param_paths": _param_paths(state), "tree": tree}
    meta = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, __meta__=meta, **arrays)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


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
        if like is not None and isinstance(value, str) and value != like:  # names, not data
            raise ValueError(f"state{path}: saved {value!r}, like= has {like!r}")
        return value
    name, shape = node["dtype"], tuple(int(d) for d in node["shape"])
    if like is not None:
        if not _is_array(like):
            raise ValueError(f"state{path}: saved an array, like= has {type(like).__name__}")
        if tuple(like.shape) != shape or dtype_name(like.dtype) != name:
            raise ValueError(
                f"state{path}: saved {name}{list(shape)}, like= has "
                f"{dtype_name(like.dtype)}{list(like.shape)}")
    raw = data[node["array"]]
    dt = _np_dtype(name)
    want = int(np.prod(shape, dtype=np.int64)) * (dt.itemsize if dt is not None else 2)
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != want:
        raise ValueError(f"state{path}: the file holds {raw.size} bytes for {name}{list(shape)} "
                         f"({want} expected); the file is corrupted")
    return _to_like(raw, name, shape, like, path)


def _bad_file(path, problem: str) -> ValueError:
    return ValueError(f"path: {os.fspath(path)!r} {problem}")


def _read(path) -> tuple[dict, dict]:
    """The JSON header and the raw arrays of a state file (``ValueError`` naming what is wrong)."""
    with open(path, "rb") as f:  # FileNotFoundError etc. pass through unchanged
        head = f.read(6)
    if not head:
        raise _bad_file(path, "is empty (0 bytes); not an arrayopt state file")
    if head.startswith(b"\x93NUMPY"):
        raise _bad_file(path, "holds a single .npy array, not an arrayopt state file (.npz)")
    if not head.startswith(b"PK"):
        raise _bad_file(path, f"is not a .npz archive (it starts with {head!r}, not a zip signature); "
                              f"not an arrayopt state file")
    try:
        data = np.load(path, allow_pickle=False)
        with data:
            if "__meta__" not in data.files:
                raise _bad_file(path, f"is a .npz archive without the arrayopt header (entries "
                                      f"{sorted(data.files)[:5]}); not an arrayopt state file "
                                      f"(was it written by numpy.savez?)")
            try:
                meta = json.loads(bytes(data["__meta__"]).decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _bad_file(path, f"has a corrupted header ({e})") from None
            if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith(FORMAT):
                raise _bad_file(path, "is a .npz archive whose header is not an arrayopt state header")
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                found = meta.get("version", meta.get("format"))
                raise _bad_file(path, f"is an arrayopt state file of format version {found!r}; this "
                                      f"arrayopt reads version {VERSION} (which records the param paths): "
                                      f"save the state again with this version")
            arrays = {k: data[k] for k in data.files if k != "__meta__"}
    except ValueError as e:
        if str(e).startswith("path: "):
            raise
        raise _bad_file(path, f"is corrupted: {e}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, NotImplementedError, RuntimeError) as e:
        # what zipfile raises on a damaged archive: NotImplementedError for a compression
        # method it does not know (a flipped header byte), RuntimeError for "encrypted,
        # password required" (a flipped flag bit)
        problem = str(e) or type(e).__name__
        if isinstance(e, EOFError) or "not a zip file" in problem or "Truncated" in problem:
            raise _bad_file(path, f"is truncated or not a .npz archive ({problem})") from None
        raise _bad_file(path, f"is corrupted ({type(e).__name__}: {problem})") from None
    except OSError as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise _bad_file(path, f"could not be read: {e}") from None
    if "tree" not in meta:
        raise _bad_file(path, "has a header without the state tree; the file is corrupted")
    return meta, arrays


def _check_param_paths(path, meta, like) -> None:
    saved, want = meta.get("param_paths"), _param_paths(like)
    if saved is None or want is None or list(saved) == want:
        return
    i = next((i for i, (a, b) in enumerate(zip(saved, want)) if a != b), min(len(saved), len(want)))
    raise _bad_file(path, f"holds a state for params leaves {saved}, but like= is a state for "
                          f"{want} (first difference at leaf {i}); pass like= a state made by init() "
                          f"for the same params tree")


def load_state(path, like: Any = None) -> Any:
    """Read a state written by :func:`save_state`.

    With ``like`` (a state of the same optimizer and params), the param paths,
    structure, shapes and dtypes are checked and arrays are placed in ``like``'s
    namespace and device; without it, arrays come back as NumPy arrays. The
    loaded state is fresh (not consumed). Raises ``ValueError`` naming the path
    and the problem for a file that is empty, truncated, corrupted, of another
    format version, or not an arrayopt state file.
    """
    meta, arrays = _read(path)
    _check_param_paths(path, meta, like)
    try:
        return fresh_tokens(_decode(meta["tree"], like, "", arrays))  # a use token per state
    except ValueError as e:
        raise ValueError(f"{e} (file {os.fspath(path)!r})") from None
    except _MALFORMED as e:
        raise _bad_file(path, f"has a malformed state tree ({type(e).__name__}: {e}); "
                              f"the file is corrupted") from None


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
