"""Grafting directions (see :class:`~arrayopt.shampoo.config.GraftingConfig`) and layer-wise norms."""

from __future__ import annotations

__all__ = ["graft_direction", "frobenius"]

_TINY = 1e-30


def frobenius(xp, x):
    """``‖x‖_F`` as a 0-d array (no host sync)."""
    return xp.sqrt(xp.sum(x * x))


def graft_direction(xp, graft, g, acc, t: int):
    """``(u_g, new_acc)`` for step ``t`` (1-based); ``acc`` is None for stateless types."""
    kind = graft.type
    if kind in ("none", "sgd"):
        return g, acc
    if kind == "sqrt_n":
        return xp.sign(g), acc
    if kind == "rmsprop_normalized":
        g = g / (frobenius(xp, g) + _TINY)
    if kind == "adagrad":
        acc = acc + g * g
        return g / (xp.sqrt(acc) + graft.eps), acc
    acc = acc * graft.b2 + (g * g) * (1.0 - graft.b2)
    if kind == "adam":
        bc2 = 1.0 - graft.b2 ** t
        return g / (xp.sqrt(acc) / (bc2 ** 0.5) + graft.eps), acc
    return g / (xp.sqrt(acc) + graft.eps), acc
