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
consumed is refused. The file is written to a private temporary file next to
``path`` and renamed over it (:mod:`arrayopt._atomic_file`), so a failed or
concurrent save leaves one whole checkpoint, and leftovers of killed saves are
removed by the next save. Loading reads only the entries the header refers
to, each bounded by what its recorded shape and dtype need, and checks every
header field, so a file that is empty, truncated, corrupted, hostile or not an
arrayopt state raises a ``ValueError`` naming the path and the problem.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from typing import Any

import numpy as np

from ._atomic_file import atomic_write
from ._state_use import fresh_tokens, is_array as _is_array, refuse_consumed, settle as _settle
from ._xp import device_of, dtype_name, library_of, namespace_of, to_numpy

__all__ = ["save_state", "load_state", "state_nbytes", "FORMAT", "VERSION", "DTYPES"]

FORMAT = "arrayopt-state"
VERSION = 2
_SCALARS = (bool, int, float, str, type(None))


def _check_not_consumed(state) -> None:
    """Refuse a state (or a nested one, e.g. in a chain) that update()/step() already consumed."""
    refuse_consumed(state, "(fused kernels may have reused its buffers); save the state that call returned")


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
    """Write ``state`` to ``path`` (a ``.npz`` file) exactly and atomically.

    Settles pending work first; refuses a consumed state. The file is written to a private
    temporary file next to ``path`` and renamed onto it (:mod:`arrayopt._atomic_file`):
    concurrent saves to one path leave one whole checkpoint, a failed save leaves the old
    file untouched, and leftovers of killed saves to ``path`` are removed.
    """
    _check_not_consumed(state)
    _settle(state)
    arrays: dict = {}
    tree = _encode(state, "", arrays)
    header = {"format": FORMAT, "version": VERSION, "param_paths": _param_paths(state), "tree": tree}
    meta = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, __meta__=meta, **arrays))


#: the dtypes save_state writes (what optimizer states hold); any other name in a header is refused
DTYPES = ("float16", "bfloat16", "float32", "float64", "bool",
          "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_ITEMSIZE = {"bool": 1, "int8": 1, "uint8": 1, "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2,
             "float32": 4, "int32": 4, "uint32": 4, "float64": 8, "int64": 8, "uint64": 8}
_SCALAR_TYPES = {"bool": (bool,), "int": (int,), "float": (float, int), "str": (str,), "NoneType": (type(None),)}
_CHUNK = 1 << 23  # bytes read from an entry at a time
_NPY_HEADER_MAX = 1 << 16  # NumPy's own limit on .npy headers is smaller


def _np_dtype(name: str):
    if name == "bfloat16":
        try:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            return None
    return np.dtype(name)


class _Archive:
    """An open state file: bounded reads of the ``.npy`` entries (stored, uncompressed, as
    ``numpy.savez`` writes them) that the header refers to; other entries are never read.

    Before an entry's data is read, its declared size must be what the caller expects (from
    the recorded shape and dtype) and must fit inside the file, so a small hostile file can
    neither make us decompress nor allocate more than its own size.
    """

    def __init__(self, path, zf: zipfile.ZipFile, size: int):
        self.path, self.zf, self.size = path, zf, size
        self.infos = {i.filename: i for i in zf.infolist()}

    def _open(self, key: str, where: str):
        info = self.infos.get(f"{key}.npy")
        if info is None:
            raise _bad_file(self.path, f"has no entry {key!r} for {where}; the file is corrupted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise _bad_file(self.path, f"entry {key!r} ({where}) is compressed (method {info.compress_type}); "
                                       f"arrayopt writes stored entries: the file is corrupted or not ours")
        if info.header_offset + 30 + info.file_size > self.size:
            raise _bad_file(self.path, f"entry {key!r} ({where}) declares {info.file_size} bytes, more than "
                                       f"the file's {self.size}; the file is corrupted")
        f = self.zf.open(info)
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f, max_header_size=_NPY_HEADER_MAX)
            head = f.tell()
        except BaseException:
            f.close()
            raise
        if dtype != np.uint8 or fortran or len(shape) != 1 or shape[0] != info.file_size - head:
            f.close()
            raise _bad_file(self.path, f"entry {key!r} ({where}) is not a byte array of its declared size "
                                       f"({dtype}{list(shape)} in {info.file_size} bytes); the file is corrupted")
        return f, info.file_size - head

    def read_into(self, key: str, out: np.ndarray, where: str) -> None:
        """Fill the uint8 array ``out`` with entry ``key``, which must hold exactly ``out.size`` bytes."""
        f, n = self._open(key, where)
        with f:
            if n != out.size:
                raise ValueError(f"state{where}: the file holds {n} bytes for it ({out.size} expected); "
                                 f"the file is corrupted")
            done = 0
            while done < n:
                chunk = f.read(min(_CHUNK, n - done))
                if not chunk:
                    raise _bad_file(self.path, f"entry {key!r} ({where}) ends early; the file is truncated")
                out[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
                done += len(chunk)
            if f.read(1):  # also makes zipfile check the entry's CRC
                raise _bad_file(self.path, f"entry {key!r} ({where}) is longer than declared; the file is corrupted")

    def read_meta(self) -> bytes:
        f, n = self._open("__meta__", "the header")
        with f:
            data = f.read(n)
            if len(data) != n or f.read(1):
                raise _bad_file(self.path, "has a header entry of the wrong length; the file is corrupted")
        return data


def _alloc(name: str, n_items: int, nbytes: int, like):
    """``(array to fill as bytes, finish)``: torch allocates through torch (its alignment, C order)."""
    if like is not None and library_of(like) == "torch":
        import torch

        t = torch.empty(n_items, dtype=getattr(torch, name))
        return t.view(torch.uint8).numpy() if nbytes else np.empty(0, np.uint8), t
    buf = np.empty(nbytes, np.uint8)
    return buf, buf


def _to_like(host, name: str, shape, like):
    """The filled buffer as an array of ``shape`` in the namespace and on the device of ``like``."""
    if like is None:
        return host.view(_np_dtype(name)).reshape(shape)
    lib = library_of(like)
    if lib == "torch":
        return host.reshape(shape).to(like.device)
    host = host.view(_np_dtype(name)).reshape(shape)
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


def _malformed(path, problem: str) -> ValueError:
    return ValueError(f"state{path}: malformed state tree: {problem}; the file is corrupted or not an "
                      f"arrayopt state")


def _node_kind(node, path) -> str:
    if not isinstance(node, dict):
        raise _malformed(path, f"a tree node is a {type(node).__name__}, not an object")
    for kind, keys in (("dict", {"dict"}), ("list", {"list"}), ("tuple", {"tuple"}),
                       ("scalar", {"scalar", "type"}), ("array", {"array", "dtype", "shape"})):
        if kind in node:
            if set(node) != keys:
                raise _malformed(path, f"a {kind} node has the fields {sorted(node)}, not {sorted(keys)}")
            return kind
    raise _malformed(path, f"a tree node has the fields {sorted(node)}")


def _scalar(node, path):
    typ, value = node["type"], node["scalar"]
    if not isinstance(typ, str) or typ not in _SCALAR_TYPES:
        raise _malformed(path, f"scalar type {typ!r} is not one of {sorted(_SCALAR_TYPES)}")
    if not isinstance(value, _SCALAR_TYPES[typ]) or (typ != "bool" and isinstance(value, bool)):
        raise _malformed(path, f"scalar {value!r} is not a {typ}")
    return float(value) if typ == "float" else value


def _array_spec(node, path, archive) -> tuple:
    """``(key, dtype name, shape, nbytes)`` of an array node, every field checked."""
    key, name, shape = node["array"], node["dtype"], node["shape"]
    if not isinstance(key, str) or not key.startswith("a") or not key[1:].isdigit():
        raise _malformed(path, f"array key {key!r} is not an arrayopt entry name")
    if not isinstance(name, str) or name not in DTYPES:
        raise _malformed(path, f"dtype {name!r} is not one arrayopt saves ({', '.join(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > 64 or not all(
            type(d) is int and 0 <= d <= archive.size for d in shape):
        raise _malformed(path, f"shape {shape!r} is not a list of at most 64 sizes in [0, file size]")
    n_items = 1
    for d in shape:
        n_items *= d
    nbytes = n_items * _ITEMSIZE[name]
    if nbytes > archive.size:
        raise _malformed(path, f"{name}{shape} needs {nbytes} bytes, more than the whole file "
                               f"({archive.size})")
    return key, name, tuple(shape), n_items, nbytes


def _check_header_fields(d: dict, path) -> None:
    """The fields every optimizer state has (``base._header``), where a dict is a state."""
    if "optimizer" not in d:
        return
    if not isinstance(d["optimizer"], str):
        raise _malformed(path, f"['optimizer'] is {d['optimizer']!r}, not a name")
    for k in ("count", "nonfinite_skipped"):
        if k in d and (type(d[k]) is not int or d[k] < 0):
            raise _malformed(path, f"[{k!r}] is {d[k]!r}, not a non-negative int")
    if "consumed" in d and type(d["consumed"]) is not bool:
        raise _malformed(path, f"['consumed'] is {d['consumed']!r}, not a bool")
    pp = d.get("param_paths")
    if pp is not None and (not isinstance(pp, (list, tuple)) or not all(isinstance(p, str) for p in pp)):
        raise _malformed(path, "['param_paths'] is not a sequence of leaf paths")


def _decode(node, like, path, archive):
    kind = _node_kind(node, path)
    if kind == "dict":
        items = node["dict"]
        if not isinstance(items, dict):
            raise _malformed(path, "a dict node does not hold an object")
        if like is not None:
            if not isinstance(like, dict) or list(like.keys()) != list(items.keys()):
                raise ValueError(
                    f"state{path}: saved keys {list(items)} do not match like= keys "
                    f"{list(like) if isinstance(like, dict) else type(like).__name__}")
        out = {k: _decode(v, None if like is None else like[k], f"{path}[{k!r}]", archive)
               for k, v in items.items()}
        _check_header_fields(out, path)
        return out
    if kind in ("list", "tuple"):
        items, typ = node[kind], (list if kind == "list" else tuple)
        if not isinstance(items, list):
            raise _malformed(path, f"a {kind} node does not hold a list")
        if like is not None and (not isinstance(like, typ) or len(like) != len(items)):
            raise ValueError(f"state{path}: saved {kind} of {len(items)} does not match like=")
        return typ(_decode(v, None if like is None else like[i], f"{path}[{i}]", archive)
                   for i, v in enumerate(items))
    if kind == "scalar":
        value = _scalar(node, path)
        if like is not None and type(like).__name__ != node["type"]:
            raise ValueError(f"state{path}: saved a {node['type']}, like= has {type(like).__name__}")
        if like is not None and isinstance(value, str) and value != like:  # names, not data
            raise ValueError(f"state{path}: saved {value!r}, like= has {like!r}")
        return value
    key, name, shape, n_items, nbytes = _array_spec(node, path, archive)
    if like is not None:
        if not _is_array(like):
            raise ValueError(f"state{path}: saved an array, like= has {type(like).__name__}")
        if tuple(like.shape) != shape or dtype_name(like.dtype) != name:
            raise ValueError(
                f"state{path}: saved {name}{list(shape)}, like= has "
                f"{dtype_name(like.dtype)}{list(like.shape)}")
    elif _np_dtype(name) is None:
        raise TypeError(f"state{path}: bfloat16 array needs like= (or ml_dtypes) to load")
    buf, host = _alloc(name, n_items, nbytes, like)
    archive.read_into(key, buf, path)
    return _to_like(host, name, shape, like)


class BytesArchive:
    """The archive interface of :func:`decode` over arrays already in memory: ``{key: uint8
    array}`` (the torch adapter's ``state_dict``, which ``torch.save`` stores)."""

    def __init__(self, arrays: dict):
        self.arrays = arrays
        self.size = sum(int(a.size) for a in arrays.values())

    def read_into(self, key: str, out: np.ndarray, where: str) -> None:
        data = self.arrays.get(key)
        if data is None:
            raise ValueError(f"state{where}: no array {key!r} holds its bytes")
        data = np.asarray(data).reshape(-1)
        if data.dtype != np.uint8 or data.size != out.size:
            raise ValueError(f"state{where}: array {key!r} holds {data.size} {data.dtype} values "
                             f"({out.size} bytes expected)")
        out[...] = data


def decode(tree, like, archive) -> Any:
    """A state from its encoded ``tree`` (:func:`_encode`) and the bytes in ``archive`` (an open
    state file, or a :class:`BytesArchive`), every field checked as :func:`load_state` does; the
    state gets a use token of its own."""
    return fresh_tokens(_decode(tree, like, "", archive))


def _bad_file(path, problem: str) -> ValueError:
    return ValueError(f"path: {os.fspath(path)!r} {problem}")


def _read_header(path, archive: _Archive) -> dict:
    """The JSON header of an open state file (``ValueError`` naming what is wrong)."""
    if "__meta__.npy" not in archive.infos:
        raise _bad_file(path, f"is a .npz archive without the arrayopt header (entries "
                              f"{sorted(archive.infos)[:5]}); not an arrayopt state file "
                              f"(was it written by numpy.savez?)")
    try:
        meta = json.loads(archive.read_meta().decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad_file(path, f"has a corrupted header ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith(FORMAT):
        raise _bad_file(path, "is a .npz archive whose header is not an arrayopt state header")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = meta.get("version", meta.get("format"))
        raise _bad_file(path, f"is an arrayopt state file of format version {found!r}; this "
                              f"arrayopt reads version {VERSION} (which records the param paths): "
                              f"save the state again with this version")
    if "tree" not in meta:
        raise _bad_file(path, "has a header without the state tree; the file is corrupted")
    pp = meta.get("param_paths")
    if pp is not None and (not isinstance(pp, list) or not all(isinstance(p, str) for p in pp)):
        raise _bad_file(path, "has a header whose param_paths is not a list of leaf paths; the file is corrupted")
    return meta


def _check_param_paths(path, meta, like) -> None:
    saved, want = meta.get("param_paths"), _param_paths(like)
    if saved is None or want is None or list(saved) == want:
        return
    i = next((i for i, (a, b) in enumerate(zip(saved, want)) if a != b), min(len(saved), len(want)))
    raise _bad_file(path, f"holds a state for params leaves {saved}, but like= is a state for "
                          f"{want} (first difference at leaf {i}); pass like= a state made by init() "
                          f"for the same params tree")


def _load(path, like):
    with open(path, "rb") as f:  # FileNotFoundError etc. pass through unchanged
        head = f.read(6)
        size = os.fstat(f.fileno()).st_size
    if not head:
        raise _bad_file(path, "is empty (0 bytes); not an arrayopt state file")
    if head.startswith(b"\x93NUMPY"):
        raise _bad_file(path, "holds a single .npy array, not an arrayopt state file (.npz)")
    if not head.startswith(b"PK"):
        raise _bad_file(path, f"is not a .npz archive (it starts with {head!r}, not a zip signature); "
                              f"not an arrayopt state file")
    with zipfile.ZipFile(path) as zf:
        archive = _Archive(path, zf, size)
        meta = _read_header(path, archive)
        _check_param_paths(path, meta, like)
        try:
            return _decode(meta["tree"], like, "", archive)
        except ValueError as e:
            if str(e).startswith("path: "):
                raise
            raise ValueError(f"{e} (file {os.fspath(path)!r})") from None


def load_state(path, like: Any = None) -> Any:
    """Read a state written by :func:`save_state`.

    With ``like`` (a state of the same optimizer and params), the param paths,
    structure, shapes and dtypes are checked and arrays are placed in ``like``'s
    namespace and device; without it, arrays come back as NumPy arrays. The
    loaded state is fresh (not consumed). Only the entries the header refers to
    are read, each after checking that its declared size is what its recorded
    shape and dtype need; every header field is checked (dtypes: :data:`DTYPES`).
    Raises ``ValueError`` naming the path and the problem for a file that is
    empty, truncated, corrupted, hostile, of another format version, or not an
    arrayopt state file.
    """
    try:
        return fresh_tokens(_load(path, like))  # a use token per state
    except ValueError as e:
        if str(e).startswith("path: ") or "(file " in str(e):
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
    except (TypeError, IndexError, AttributeError, OverflowError, RecursionError, MemoryError) as e:
        if isinstance(e, TypeError) and str(e).startswith("state["):
            raise
        raise _bad_file(path, f"has a malformed state tree ({type(e).__name__}: {str(e)[:200]}); "
                              f"the file is corrupted") from None
    except OSError as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise _bad_file(path, f"could not be read: {e}") from None


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
