"""Numba CPU backend: fused in-place kernels for NumPy arrays and torch CPU tensors.

Accepted arrays: NumPy arrays that are C-contiguous and float32/float64 (params and
state writeable), and torch CPU tensors with the same properties, reached zero-copy
through ``tensor.detach().numpy()``. Everything else takes the reference path.

One module per op, each declaring ``OPS`` and ``run`` (``backends/_optable.py``):
``first_order.py`` (``sgd``, ``adam``, ``adagrad``), ``sonew/``, ``eva.py``, ``sketchy.py``,
``shampoo.py`` (``shampoo_corrected``); ``_common.py`` holds the compile flags and reductions
they share. :data:`TABLE` is collected from them at import: ``ops``, ``capabilities`` and
``run`` all read it.
"""

from __future__ import annotations

import importlib.util
from types import MappingProxyType

import numpy as np

from ..._xp import library_of
from .._optable import collect
from ._common import all_finite

__all__ = ["BACKEND", "NumbaCPU", "TABLE"]

#: ``{op: OpEntry(module, capabilities)}`` from every op module of this package
TABLE = collect(__name__, __path__)

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _numpy_view(a, library: str):
    return a.detach().numpy() if library == "torch" else a


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

    def views(self, arrays) -> list:
        """Flat writeable NumPy views sharing memory with ``arrays``."""
        if not arrays:
            return []
        lib = library_of(arrays[0])
        return [_numpy_view(a, lib).reshape(-1) for a in arrays]

    def all_finite(self, views) -> bool:
        """True when no view holds NaN/Inf (one read-only pass per leaf)."""
        return all_finite(views)

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


BACKEND = NumbaCPU()
