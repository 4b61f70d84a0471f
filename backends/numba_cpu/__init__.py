"""Numba CPU backend: fused in-place kernels for NumPy arrays and torch CPU tensors.

Accepted arrays: NumPy arrays and torch CPU tensors, float32/float64 (params and state
writeable), reached zero-copy (torch through ``tensor.detach().numpy()``). Each op module
declares the memory layouts its kernels take (``LAYOUT``, default ``"contiguous"``):

- ``"contiguous"``: every array C-contiguous;
- ``"storage"`` (elementwise math, order-free): also a *dense permuted* leaf (its strides a
  permutation of a contiguous layout, e.g. a ``channels_last`` conv weight), provided every
  array shaped like the param has the param's strides: the kernels run over the storage;
- ``"copy"`` (math that follows the logical C order of the shape, SONew's band): also a dense
  permuted leaf in any mix of strides; the op copies it to C order and back.

:meth:`NumbaCPU.refuse_leaves` says which leaves of a call an op takes (the others take the
reference); :meth:`NumbaCPU.refuse_arrays` is the all-or-nothing ``"contiguous"`` question.

One module per op, each declaring ``OPS`` and ``run`` (``backends/_optable.py``):
``first_order.py`` (``sgd``, ``adam``, ``adagrad``), ``sonew/``, ``eva.py``, ``sketchy.py``,
``shampoo.py`` (``shampoo_corrected``); ``_common.py`` holds the compile flags and reductions
they share. :data:`TABLE` is collected from them at import: ``ops``, ``capabilities`` and
``run`` all read it.
"""

from __future__ import annotations

import importlib.util
import math
from types import MappingProxyType

import numpy as np

from ..._overflow import squares_below
from ..._xp import library_of
from .._optable import collect
from ._common import SMALL, all_finite, sum_squares

__all__ = ["BACKEND", "NumbaCPU", "TABLE", "dense_strides"]

#: ``{op: OpEntry(module, capabilities)}`` from every op module of this package
TABLE = collect(__name__, __path__)

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _numpy_view(a, library: str):
    return a.detach().numpy() if library == "torch" else a


class Views(list):
    """The flat NumPy views of :meth:`NumbaCPU.views` for NumPy arrays: a list, with the range
    check ``arrayopt._overflow.gradients_in_range`` reads (:meth:`squares_below`)."""

    __slots__ = ()

    def take(self, indices) -> "Views":
        """The views at ``indices``, as views of this kind."""
        return Views(self[i] for i in indices)

    def squares_below(self, fraction) -> bool:
        """Whether every view has ``‖v‖² < fraction·max(dtype)``."""
        return squares_below(self, fraction, sum_squares)


class LazyViews:
    """The flat NumPy views of :meth:`NumbaCPU.views` for torch tensors, each made when first read.

    Reads (``[i]``, iteration, ``len``) give what a list of views would; the kernels that take
    small leaves by address (``_ptrs.py``) read ``tensors`` and never make the views.
    """

    __slots__ = ("tensors", "_made")

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self._made = [None] * len(self.tensors)

    def __len__(self):
        return len(self.tensors)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        v = self._made[i]
        if v is None:
            v = self._made[i] = self.tensors[i].detach().numpy().reshape(-1)
        return v

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, indices) -> "LazyViews":
        """The views at ``indices``, still lazy (none is made)."""
        return LazyViews([self.tensors[i] for i in indices])

    def small_tables(self):
        """``({dtype: (addrs, sizes)}, large)``: the small contiguous float32/float64 tensors as one
        address table per dtype (``_ptrs.py``), and the indices of the others."""
        from ._ptrs import address_table

        import torch

        floats = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
        by_dtype: dict = {}
        large = []
        for i, t in enumerate(self.tensors):
            dt = floats.get(t.dtype)
            if dt is not None and t.numel() < SMALL and t.is_contiguous():
                by_dtype.setdefault(dt, []).append((t.numel(), t.data_ptr()))
            else:
                large.append(i)
        return {dt: address_table(rows) for dt, rows in by_dtype.items()}, large

    def squares_below(self, fraction) -> bool:
        """Whether every view has ``‖v‖² < fraction·max(dtype)``: the small tensors in one call per
        dtype, by address; the others per view."""
        from ._ptrs import squares_below_addrs

        tables, large = self.small_tables()
        for dt, (addrs, sizes) in tables.items():
            if not squares_below_addrs(addrs[:, 0], sizes, dt.type(0), dt.type(float(np.finfo(dt).max) * fraction)):
                return False
        return squares_below([self[i] for i in large], fraction, sum_squares)


def _flat(a) -> np.ndarray:
    """The flat view of a NumPy array over its storage order (C order when C-contiguous; a dense
    permuted array is transposed to its storage order first: still a view)."""
    if a.flags.c_contiguous:
        return a.reshape(-1)
    order = sorted(range(a.ndim), key=lambda d: -abs(a.strides[d]))
    flat = a.transpose(order).reshape(-1)
    if not np.shares_memory(flat, a):  # pragma: no cover - refuse_leaves lets no such array through
        raise ValueError("numba_cpu: a flat view of a non-dense array would be a copy")
    return flat


def dense_strides(shape, strides) -> bool:
    """Whether ``strides`` (in elements) are a permutation of a contiguous layout of ``shape``:
    the array covers ``prod(shape)`` consecutive elements, each once (size-1 axes ignored)."""
    expect = 1
    for st, n in sorted((st, n) for n, st in zip(shape, strides) if n != 1):
        if st != expect:
            return False
        expect *= n
    return True


def _strides(a, lib):
    """Strides in elements (NumPy: bytes / itemsize)."""
    if lib == "torch":
        return tuple(a.stride())
    return tuple(s // a.itemsize for s in a.strides)


class NumbaCPU:
    """The ``numba_cpu`` backend (see the module docstring and ``arrayopt.dispatch.Backend``)."""

    name = "numba_cpu"
    ops = frozenset(TABLE)
    # which options of each op's step description the kernels fuse: declared by each op module
    capabilities = MappingProxyType({op: entry.capabilities for op, entry in TABLE.items()})

    def __init__(self):
        self._available = None

    def available(self) -> bool:
        if self._available is None:
            self._available = importlib.util.find_spec("numba") is not None
        return self._available

    def reason(self) -> str:
        if not self.available():
            return "numba is not installed"
        return "NumPy arrays and torch CPU tensors (float32/float64, C-contiguous)"

    def refuse_options(self, op, step):
        from .._optable import check_capabilities

        return check_capabilities(self.capabilities, op, step)

    def refuse_arrays(self, ns, *groups):
        """``None`` if the kernels take these arrays, else why not (first offending leaf)."""
        lib = ns.library
        names = ("params", "grads") + ("state",) * max(0, len(groups) - 2)
        if lib == "numpy":
            for name, group in zip(names, groups):
                for i, a in enumerate(group):
                    if a.dtype not in _FLOATS:
                        return f"{name} leaf {i}: dtype {a.dtype} (kernels take float32/float64)"
                    if not a.flags.c_contiguous:
                        return f"{name} leaf {i}: not C-contiguous"
                    if name != "grads" and not a.flags.writeable:
                        return f"{name} leaf {i}: read-only (kernels update in place)"
            return None
        if lib == "torch":
            import torch

            ok = (torch.float32, torch.float64)
            # the common case read inline (a float tensor is never a lazy conj view; ``is_cpu`` is a
            # sixth of ``device.type``); the named checks below only when one fails
            if all(a.is_cpu and a.dtype in ok and a.is_contiguous() and not a.is_neg()
                   for group in groups for a in group):
                return None
            for name, group in zip(names, groups):
                for i, a in enumerate(group):
                    if a.device.type != "cpu":
                        return f"{name} leaf {i}: on device {a.device} (numba_cpu takes CPU tensors)"
                    if a.dtype not in ok:
                        return f"{name} leaf {i}: dtype {str(a.dtype).replace('torch.', '')} " \
                               f"(kernels take float32/float64)"
                    if not a.is_contiguous():
                        return f"{name} leaf {i}: not contiguous"
                    if a.is_conj() or a.is_neg():
                        return f"{name} leaf {i}: a lazy conj/neg view"
            return None
        return f"{lib} arrays are not taken (NumPy arrays and torch CPU tensors only)"

    def accepts(self, ns, *groups) -> bool:
        """``refuse_arrays(ns, *groups) is None``."""
        return self.refuse_arrays(ns, *groups) is None

    def refuse_leaves(self, op, ns, *groups) -> list:
        """Per leaf: ``None`` if ``op``'s kernels take its arrays (params, grads, state groups), else
        why not. The layouts an op takes are its module's ``LAYOUT`` (see the module docstring)."""
        lib = ns.library
        if lib not in ("numpy", "torch"):
            why = f"{lib} arrays are not taken (NumPy arrays and torch CPU tensors only)"
            return [why] * len(groups[0])
        entry = TABLE.get(op)
        layout = getattr(entry.module, "LAYOUT", "contiguous") if entry is not None else "contiguous"
        names = ("params", "grads") + ("state",) * max(0, len(groups) - 2)
        if lib == "torch":
            import torch

            if getattr(ns.device, "type", "cpu") != "cpu":
                return [f"params leaf {i}: on device {ns.device} (numba_cpu takes CPU tensors)"
                        for i in range(len(groups[0]))]
            floats = (torch.float32, torch.float64)
            out = [None] * len(groups[0])
            for i, arrays in enumerate(zip(*groups)):  # the common case read inline: a call per leaf costs
                for a in arrays:
                    if a.dtype not in floats or a.is_neg() or not a.is_contiguous():
                        out[i] = _refuse_torch_leaf(i, names, list(arrays), layout, floats)
                        break
            return out
        return [_refuse_numpy_leaf(i, names, [grp[i] for grp in groups], layout) for i in range(len(groups[0]))]

    def views(self, arrays) -> list:
        """Flat NumPy vectors of ``arrays`` in C order: views sharing memory with C-contiguous
        arrays (writeable ones for writeable arrays), copies of the others."""
        if not arrays:
            return []
        lib = library_of(arrays[0])
        if lib == "torch":
            return LazyViews(arrays)
        return Views(a.reshape(-1) for a in arrays)

    def storage_views(self, arrays) -> list:
        """Flat writeable NumPy views sharing memory with dense ``arrays``, each over its storage
        order (C order for C-contiguous arrays; see :meth:`refuse_leaves` for the others)."""
        if not arrays:
            return []
        lib = library_of(arrays[0])
        return [_flat(_numpy_view(a, lib)) for a in arrays]

    def all_finite(self, views) -> bool:
        """True when no view holds NaN/Inf (one read-only pass per leaf; the small contiguous torch
        tensors of :class:`LazyViews` in one call per dtype, by address)."""
        if not isinstance(views, LazyViews):
            return all_finite(views)
        from ._ptrs import count_nonfinite_addrs, sum_addrs

        tables, large = views.small_tables()
        for dt, (addrs, sizes) in tables.items():
            like = dt.type(0)
            if not math.isfinite(sum_addrs(addrs[:, 0], sizes, like)) and count_nonfinite_addrs(
                    addrs[:, 0], sizes, like):
                return False
        return all_finite([views[i] for i in large])

    def run(self, op, params, grads, states, step, g_views=None):
        """The fused step of ``op`` in place: the ``run`` of the module that declares ``op``.

        ``step`` is the op's frozen step description; ``states`` and the return value are the
        op module's (first-order ops: ``step_scalars``, ``None``; ``"sonew"``: per-leaf
        ``(removed_edges, fallback_rows)``; ``"shampoo_corrected"``: the scaled blocks ``X``).
        """
        entry = TABLE.get(op)
        if entry is None:
            raise ValueError(f"op {op!r}: numba_cpu has no kernel for it (ops: {', '.join(sorted(TABLE))})")
        return entry.module.run(self, op, params, grads, states, step, g_views)


def _refuse_torch_leaf(i, names, arrays, layout, floats):
    """Why ``op`` cannot take leaf ``i`` (``arrays``: its param, grad, state arrays), or ``None``."""
    # a float32/float64 tensor has no conjugate bit (only complex ones do): only the negative bit
    contiguous = True
    for a in arrays:
        if a.dtype not in floats or a.is_neg():
            break
        contiguous = contiguous and a.is_contiguous()
    else:
        return None if contiguous else _refuse_layout(i, names, arrays, layout, "torch")
    for name, a in zip(names, arrays):
        if a.dtype not in floats:
            return f"{name} leaf {i}: dtype {str(a.dtype).replace('torch.', '')} (kernels take float32/float64)"
        if a.is_neg():
            return f"{name} leaf {i}: a lazy conj/neg view"
    return None  # pragma: no cover


def _refuse_numpy_leaf(i, names, arrays, layout):
    for name, a in zip(names, arrays):
        if a.dtype not in _FLOATS:
            return f"{name} leaf {i}: dtype {a.dtype} (kernels take float32/float64)"
        if name != "grads" and not a.flags.writeable:
            return f"{name} leaf {i}: read-only (kernels update in place)"
    if all(a.flags.c_contiguous for a in arrays):
        return None
    return _refuse_layout(i, names, arrays, layout, "numpy")


def _refuse_layout(i, names, arrays, layout, lib):
    """The layout rule of ``layout`` for a leaf with a non-C-contiguous array."""
    contiguous = "not contiguous" if lib == "torch" else "not C-contiguous"
    shape = tuple(arrays[0].shape)
    p_strides = _strides(arrays[0], lib)
    for name, a in zip(names, arrays):
        c = a.is_contiguous() if lib == "torch" else a.flags.c_contiguous
        if c:
            continue
        if layout == "contiguous":
            return f"{name} leaf {i}: {contiguous}"
        st = _strides(a, lib)
        if not dense_strides(tuple(a.shape), st):
            return f"{name} leaf {i}: {contiguous} and not a dense permuted layout"
        if tuple(a.shape) != shape:  # e.g. SONew's band state
            return f"{name} leaf {i}: {contiguous}"
    if layout == "storage":
        for name, a in zip(names, arrays):
            if tuple(a.shape) == shape and _strides(a, lib) != p_strides:
                return (f"{name} leaf {i}: strides {_strides(a, lib)} differ from the params' {p_strides} "
                        f"(the elementwise kernels run over the storage of arrays of one layout)")
    return None


BACKEND = NumbaCPU()
