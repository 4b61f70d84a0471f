r"""Grafting: the step size of a first-order method, the direction of another.

Agarwal, Anil, Hazan, Koren, Zhang, "Disentangling Adaptive Gradient Methods from
Learning Rates" (arXiv 2002.11803), §2: given a preconditioned direction ``d`` and
a first-order direction ``a`` (the *graft*), the update is

.. math::
    u = \frac{\|a\|_2}{\|d\|_2}\, d \qquad(u = 0 \text{ when } \|d\|_2 = 0)

with the norms over a whole layer (``per="layer"``, Shampoo's and SONew's
default) or over each block of the layer (``per="block"``, Meta's
``distributed_shampoo``). One module serves SONew, Shampoo and the coming
Sketchy and Eva; kernels implement the same formulas and are tested against it.

Directions ``a`` from the gradient ``g`` (step ``t`` 1-based, ``A`` the graft's
own accumulator, ``ε`` the graft eps):

=======================  ==================================================================
``"sgd"``                ``a = g``
``"adagrad"``            ``A ← A + g²;  a = g / (√A + ε)``
``"rmsprop"``            ``A ← β₂A + (1-β₂) g²;  a = g / (√A + ε)``
``"rmsprop_normalized"`` ``ĝ = g / ‖g‖;  A ← β₂A + (1-β₂) ĝ²;  a = ĝ / (√A + ε)``
``"adam"``               ``A ← β₂A + (1-β₂) g²;  a = g / (√A / √(1-β₂ᵗ) + ε)``
=======================  ==================================================================

(no momentum inside the graft: the optimizer applies its own). An optimizer whose
statistics already hold Adam's moments (SONew: ``m̂`` and ``v̂ = Ĥ_{ii}``) uses
:func:`adam_direction` on them.

Norms are overflow- and underflow-safe in float32: :func:`norm` scales by
``max|x|`` before squaring, so ``‖x‖`` is finite whenever ``max|x|`` is.
"""

from __future__ import annotations

__all__ = ["DIRECTIONS", "GRANULARITIES", "norm", "graft_scale", "graft",
           "direction", "adam_direction", "has_accumulator"]

DIRECTIONS = ("sgd", "adagrad", "rmsprop", "rmsprop_normalized", "adam")
GRANULARITIES = ("layer", "block")


def norm(xp, x):
    r"""``‖x‖₂`` as a 0-d array, safe from overflow and underflow: ``s·‖x/s‖₂``, ``s = max|x|``.

    ``0`` for an all-zero (or empty) ``x``. No host synchronisation.
    """
    if 0 in tuple(x.shape):
        return xp.sum(x)  # 0, on x's device
    amax = xp.max(xp.abs(x))
    scale = xp.where(amax > 0, amax, xp.ones_like(amax))
    y = x / scale
    return amax * xp.sqrt(xp.sum(y * y))


def graft_scale(xp, target_norm, direction_norm):
    r"""``‖a‖ / ‖d‖``, and ``0`` when ``‖d‖ = 0`` (the zero guard: ``u = 0``, never NaN)."""
    ok = direction_norm > 0
    safe = xp.where(ok, direction_norm, xp.ones_like(direction_norm))
    return xp.where(ok, target_norm / safe, xp.zeros_like(target_norm / safe))


def graft(xp, d, a):
    r"""``u = (‖a‖/‖d‖)·d`` over the whole array (per layer)."""
    return d * graft_scale(xp, norm(xp, a), norm(xp, d))


def has_accumulator(kind: str) -> bool:
    """Whether direction ``kind`` keeps an accumulator ``A`` (the shape of the param)."""
    return kind in ("adagrad", "rmsprop", "rmsprop_normalized", "adam")


def direction(xp, kind: str, g, acc, t: int, *, b2: float = 0.999, eps: float = 1e-8):
    """``(a, new_acc)`` for step ``t`` (1-based); see the table in the module docstring.

    ``acc`` is ``None`` for ``"sgd"``.
    """
    if kind not in DIRECTIONS:
        raise ValueError(f"graft: must be one of {list(DIRECTIONS)}, got {kind!r}")
    if kind == "sgd":
        return g, acc
    if kind == "rmsprop_normalized":
        n = norm(xp, g)
        g = g / xp.where(n > 0, n, xp.ones_like(n))
    if kind == "adagrad":
        acc = acc + g * g
        return g / (xp.sqrt(acc) + eps), acc
    acc = acc * b2 + (g * g) * (1.0 - b2)
    if kind == "adam":
        bc2 = 1.0 - b2 ** t
        return g / (xp.sqrt(acc) / (bc2 ** 0.5) + eps), acc
    return g / (xp.sqrt(acc) + eps), acc


def adam_direction(xp, mhat, vhat, eps):
    r"""Adam's direction from bias-corrected moments: ``m̂ / (√v̂ + ε)``."""
    return mhat / (xp.sqrt(vhat) + eps)
