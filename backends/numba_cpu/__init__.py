"""Numba CPU backend: fused in-place kernels for NumPy arrays and torch CPU tensors.

Accepted arrays: NumPy arrays that are C-contiguous and float32/float64 (params and
state writeable), and torch CPU tensors with the same properties, reached zero-copy
through ``tensor.detach().numpy()``. Everything else takes the reference path.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from ..._xp import library_of

__all__ = ["BACKEND", "NumbaCPU"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _numpy_view(a, library: str):
    return a.detach().numpy() if library == "torch" else a


class NumbaCPU:
    """The ``numba_cpu`` backend (see the module docstring)."""

    name = "numba_cpu"
    ops = frozenset({"sgd", "adam", "adagrad", "sonew"})
    sonew_block_and_order = True  # the SONew kernels apply ``block_size`` cuts and ``flatten_order="F"``

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

    def accepts(self, ns, *groups) -> bool:
        lib = ns.library
        if lib == "numpy":
            for group in groups:
                for a in group:
                    if a.dtype not in _FLOATS or not a.flags.c_contiguous:
                        return False
            params = groups[0]
            return all(a.flags.writeable for g in (params,) + groups[2:] for a in g)
        if lib == "torch":
            import torch

            ok = (torch.float32, torch.float64)
            for group in groups:
                for a in group:
                    if a.device.type != "cpu" or a.dtype not in ok or not a.is_contiguous():
                        return False
                    if a.is_conj() or a.is_neg():
                        return False
            return True
        return False

    def views(self, arrays) -> list:
        """Flat writeable NumPy views sharing memory with ``arrays``."""
        if not arrays:
            return []
        lib = library_of(arrays[0])
        return [_numpy_view(a, lib).reshape(-1) for a in arrays]

    def all_finite(self, views) -> bool:
        from .kernels import all_finite

        return all_finite(views)

    def run(self, op, params, grads, states, scalars, g_views=None) -> None:
        from .kernels import kernel_for

        p_views = self.views(params)
        g_views = g_views if g_views is not None else self.views(grads)
        s_views = [self.views(s) for s in states]
        typed_by_dtype: dict = {}
        for i, (p, g) in enumerate(zip(p_views, g_views)):
            typed = typed_by_dtype.get(p.dtype)
            if typed is None:  # float32 scalars for float32 leaves, float64 for float64
                cast = p.dtype.type
                typed = typed_by_dtype[p.dtype] = tuple(s if isinstance(s, bool) else cast(s) for s in scalars)
            kernel_for(op, len(states), p.size)(p, g, *[sv[i] for sv in s_views], *typed)


    def run_sonew(self, opt, params, grads, mus, bands, scalars, g_views=None) -> list:
        """SONew's fused step (``backends/numba_cpu/sonew.py``); returns per-leaf removal counts."""
        from .sonew import run

        return run(self, opt, params, grads, mus, bands, scalars, g_views)


BACKEND = NumbaCPU()
