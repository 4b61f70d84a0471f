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
    """The ``numba_cpu`` backend (see the module docstring and ``arrayopt.dispatch.Backend``)."""

    name = "numba_cpu"
    ops = frozenset({"sgd", "adam", "adagrad", "sonew", "eva", "sketchy", "shampoo_corrected"})
    # the one place that says which options of each op's step description the kernels fuse
    capabilities = {
        "sgd": {}, "adam": {}, "adagrad": {},
        "sonew": {
            # every graft and fallback, any band (b <= 8 unrolled, larger generic), whole-tensor and
            # block-local (block_size: one pass per block, sonew_blocks.py), flatten orders C and F
        },
        # Eva-s preconditions every tensor with one vector per axis: the reference runs it
        "eva": {"variant": frozenset({"eva", "eva_f"}), "weight_layout": frozenset({"out_in"})},
        # rmsprop_normalized needs ‖g‖ before its accumulator, sqrt_n is rare: the reference runs them
        "sketchy": {"graft": frozenset({"none", "sgd", "adagrad", "rmsprop", "adam"})},
        # eigenvalue-corrected Shampoo: the eigenbasis second moment and scaled step, any β (1: running sum)
        "shampoo_corrected": {},
    }

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
        from .kernels import all_finite

        return all_finite(views)

    def run(self, op, params, grads, states, step, g_views=None):
        """The fused step of ``op`` in place; ``step`` is the op's frozen step description.

        First-order ops: ``step`` is the tuple of ``step_scalars``, returns ``None``.
        ``"sonew"``: ``states = [mus, bands]`` (``[mus, bands, graft_nus]`` with
        ``graft="rmsprop_normalized"``), ``step`` a ``SONewStep``; returns per-leaf
        ``(removed_edges, fallback_rows)``. ``"eva"``: ``states = [buffers or None, layers]``,
        ``step`` an ``EvaStep`` (``backends/numba_cpu/eva.py``). ``"sketchy"``: ``states = [graft
        accumulators or None, momentum or None, per-leaf D or None]``, ``step`` a ``SketchyStep``
        (``backends/numba_cpu/sketchy.py``). ``"shampoo_corrected"``: ``params`` are the rotated
        blocks ``Ĝ``, ``grads`` unused, ``states = [second moments D]``, ``step`` a
        ``CorrectedMomentStep``; returns the scaled blocks ``X`` (``backends/numba_cpu/shampoo.py``).
        """
        if op == "shampoo_corrected":  # params = rotated blocks Ĝ, states = [second moments D]
            from .shampoo import run as run_shampoo

            return run_shampoo(self, step, params, states[0])
        if op == "sonew":
            return self.run_sonew(step, params, grads, *states, g_views=g_views)
        if op == "sketchy":  # states = [graft accumulators or None, momentum or None, directions D]
            from .sketchy import run as run_sketchy

            return run_sketchy(self, step, params, grads, states[0], states[1], states[2], g_views)
        if op == "eva":  # states = [momentum buffers or None, per-layer (i, b, ā, ḡ)]
            from .eva import run as run_eva

            return run_eva(self, step, params, grads, states[0], states[1], g_views)
        from .kernels import kernel_for

        p_views = self.views(params)
        g_views = g_views if g_views is not None else self.views(grads)
        s_views = [self.views(s) for s in states]
        typed_by_dtype: dict = {}
        for i, (p, g) in enumerate(zip(p_views, g_views)):
            typed = typed_by_dtype.get(p.dtype)
            if typed is None:  # float32 scalars for float32 leaves, float64 for float64
                cast = p.dtype.type
                typed = typed_by_dtype[p.dtype] = tuple(s if isinstance(s, bool) else cast(s) for s in step)
            kernel_for(op, len(states), p.size)(p, g, *[sv[i] for sv in s_views], *typed)
        return None

    def run_sonew(self, step, params, grads, mus, bands, nus=None, g_views=None) -> list:
        """SONew's fused step (``backends/numba_cpu/sonew.py``); returns per-leaf removal counts."""
        from .sonew import run

        return run(self, step, params, grads, mus, bands, g_views, nus)


BACKEND = NumbaCPU()
