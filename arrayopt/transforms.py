"""Gradient transforms that compose with optimizers through :func:`arrayopt.chain`.

>>> import arrayopt as ao
>>> opt = ao.chain(ao.clip_by_global_norm(1.0), ao.adam(1e-3))
"""

from __future__ import annotations

from . import _validate
from .base import Optimizer

__all__ = ["clip_by_global_norm", "scale"]


class _Stateless(Optimizer):
    def _init(self, ns, leaves):
        return {}

    def _step(self, ns, leaves, g_leaves, state, paths):  # a transform has no fused step
        return super()._step(ns, leaves, g_leaves, state, paths)


class ClipByGlobalNorm(_Stateless):
    r"""``g ← g · min(1, c / ‖g‖₂)`` with ``‖g‖₂`` over all leaves (computed in float32 or wider)."""

    name = "clip_by_global_norm"

    def __init__(self, max_norm: float, *, on_nonfinite="raise"):
        super().__init__(on_nonfinite=on_nonfinite)
        self.max_norm = _validate.check_real("max_norm", max_norm, 0.0, low_open=True)
        self.hyperparams = {"max_norm": max_norm}

    def _update(self, ns, leaves, g_leaves, state, paths):
        xp = ns.xp
        sq = [xp.sum(xp.astype(g, xp.float32) ** 2) if g.dtype not in (xp.float32, xp.float64)
              else xp.sum(g * g) for g in g_leaves]
        total = float(sum(float(s) for s in sq)) ** 0.5
        factor = min(1.0, self.max_norm / total) if total > 0 else 1.0
        return [g * factor if factor != 1.0 else g for g in g_leaves], dict(state, count=state["count"] + 1)


class Scale(_Stateless):
    """``g ← s · g``."""

    name = "scale"

    def __init__(self, factor: float, *, on_nonfinite="raise"):
        super().__init__(on_nonfinite=on_nonfinite)
        self.factor = _validate.check_real("factor", factor)
        self.hyperparams = {"factor": factor}

    def _update(self, ns, leaves, g_leaves, state, paths):
        return [g * self.factor for g in g_leaves], dict(state, count=state["count"] + 1)


def clip_by_global_norm(max_norm: float, *, on_nonfinite="raise") -> Optimizer:
    return ClipByGlobalNorm(max_norm, on_nonfinite=on_nonfinite)


def scale(factor: float, *, on_nonfinite="raise") -> Optimizer:
    return Scale(factor, on_nonfinite=on_nonfinite)
