r"""Grafting: the step size of a first-order method, the direction of another.

Agarwal, Anil, Hazan, Koren, Zhang, "Disentangling Adaptive Gradient Methods from
Learning Rates" (arXiv 2002.11803), §2 (Algorithm 1): given a preconditioned
direction ``d`` and a first-order direction ``a`` (the *graft*), the update is

.. math::
    u = \frac{\|a\|_2}{\|d\|_2}\, d \qquad(u = 0 \text{ when } \|d\|_2 = 0:\ \text{the zero guard})

with the norms over a whole layer (``per="layer"``: SONew, and Shampoo's
default) or over each block of the layer (``per="block"``: Meta's
``distributed_shampoo``, where each block is grafted on its own). One module
serves SONew, Shampoo, Sketchy and Eva; kernels implement the
same formulas and are tested against it (``tests/test_grafting.py``).

Directions ``a`` from the gradient ``g`` (step ``t`` 1-based, ``A`` the graft's
own accumulator, zero at ``t = 0``, ``ε`` the graft eps):

=======================  ==================================================================
``"sgd"``                ``a = g``
``"sqrt_n"``             ``a = sign(g)`` (``‖a‖ = √n`` for a gradient without zeros)
``"adagrad"``            ``A ← A + g²;  a = g / (√A + ε)``
``"rmsprop"``            ``A ← β₂A + (1-β₂) g²;  a = g / (√A + ε)``
``"rmsprop_normalized"`` ``ĝ = g / ‖g‖;  A ← β₂A + (1-β₂) ĝ²;  a = ĝ / (√A + ε)``
``"adam"``               ``A ← β₂A + (1-β₂) g²;  a = g / (√A / √(1-β₂ᵗ) + ε)``
=======================  ==================================================================

There is no momentum inside the graft: the optimizer applies its own. An
optimizer whose statistics already hold Adam's moments (SONew: ``m̂`` and
``v̂ = Ĥ_{ii}``) takes :func:`adam_direction` of them.

Norms are overflow- and underflow-safe in float32: :func:`norm` divides by
``s = max|x|`` before squaring, ``‖x‖ = s·‖x/s‖``, so the result is finite
whenever ``max|x|`` is (kernels may instead accumulate float64 squares of the
float32 entries, which is equivalent: no float32 square ever rounds to 0 or inf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _validate

__all__ = ["DIRECTIONS", "GRANULARITIES", "norm", "norm_of_blocks", "block_norms", "graft_scale", "graft", "graft_blocks",
           "direction", "adam_direction", "has_accumulator", "check_direction", "check_granularity",
           "GraftingConfig", "as_grafting", "GRAFT_TYPES", "GRAFT_WITH_STATE"]

GRAFT_TYPES = ("none", "sgd", "adagrad", "rmsprop", "rmsprop_normalized", "adam", "sqrt_n")
#: grafting types that keep a diagonal second-moment accumulator
GRAFT_WITH_STATE = ("adagrad", "rmsprop", "rmsprop_normalized", "adam")


DIRECTIONS = ("sgd", "sqrt_n", "adagrad", "rmsprop", "rmsprop_normalized", "adam")
GRANULARITIES = ("layer", "block")
_WITH_ACCUMULATOR = ("adagrad", "rmsprop", "rmsprop_normalized", "adam")


def check_direction(kind) -> str:
    """``kind`` if it is one of :data:`DIRECTIONS`, else a ``ValueError`` naming ``graft``."""
    if kind not in DIRECTIONS:
        raise ValueError(f"graft: must be one of {list(DIRECTIONS)}, got {kind!r}")
    return kind


def check_granularity(per) -> str:
    """``per`` if it is ``"layer"`` or ``"block"``, else a ``ValueError`` naming ``graft_per``."""
    if per not in GRANULARITIES:
        raise ValueError(f"graft_per: must be one of {list(GRANULARITIES)}, got {per!r}")
    return per


def norm(xp, x):
    r"""``‖x‖₂`` as a 0-d array, safe from overflow and underflow: ``s·‖x/s‖₂`` with ``s = max|x|``.

    ``0`` for an all-zero or empty ``x``; no host synchronisation.
    """
    if 0 in tuple(x.shape):
        return xp.sum(x)  # 0, on x's device
    amax = xp.max(xp.abs(x))
    scale = xp.where(amax > 0, amax, xp.ones_like(amax))
    y = x / scale
    return amax * xp.sqrt(xp.sum(y * y))


def norm_of_blocks(xp, blocks):
    r"""``‖(x_1, …, x_k)‖₂``: the norm of several arrays taken together, overflow-safe as :func:`norm`."""
    blocks = [b for b in blocks if 0 not in tuple(b.shape)]
    if not blocks:
        raise ValueError("blocks: expected at least one non-empty array")
    if len(blocks) == 1:
        return norm(xp, blocks[0])
    amax = xp.max(xp.stack([xp.max(xp.abs(b)) for b in blocks]))
    scale = xp.where(amax > 0, amax, xp.ones_like(amax))
    total = sum(xp.sum((b / scale) * (b / scale)) for b in blocks)
    return amax * xp.sqrt(total)


def block_norms(xp, x, size: int):
    r"""``‖x_i‖₂`` of the consecutive blocks ``x_i = x[i·size : (i+1)·size]`` of a 1-D ``x``.

    Shape ``(⌈n/size⌉,)`` (the last block may be shorter); each norm is overflow-safe
    as :func:`norm` (``s_i·‖x_i/s_i‖₂``, ``s_i = max|x_i|``). Block-local grafting
    (SONew's ``block_size``) takes one scale per block from these.
    """
    n = x.shape[0]
    nb = -(-n // size)
    pad = nb * size - n
    if pad:
        x = xp.concat([x, xp.zeros((pad,), dtype=x.dtype, device=_device(x))])
    xb = xp.reshape(x, (nb, size))
    amax = xp.max(xp.abs(xb), axis=1)
    scale = xp.where(amax > 0, amax, xp.ones_like(amax))
    y = xb / xp.reshape(scale, (nb, 1))
    return amax * xp.sqrt(xp.sum(y * y, axis=1))


def _device(x):
    from ._xp import device_of

    return device_of(x)


def graft_scale(xp, target_norm, direction_norm):
    r"""``‖a‖ / ‖d‖``, and ``0`` when ``‖d‖ = 0`` (the zero guard: ``u = 0``, never NaN)."""
    ok = direction_norm > 0
    safe = xp.where(ok, direction_norm, xp.ones_like(direction_norm))
    ratio = target_norm / safe
    return xp.where(ok, ratio, xp.zeros_like(ratio))


def graft(xp, d, a):
    r"""``u = (‖a‖/‖d‖)·d`` over the whole array (one layer)."""
    return d * graft_scale(xp, norm(xp, a), norm(xp, d))


def graft_blocks(xp, d_blocks, a_blocks, per: str = "layer") -> list:
    r"""Graft the blocks ``d_i`` of a layer onto the blocks ``a_i`` of its first-order direction.

    ``per="layer"``: one scale ``‖(a_1..a_k)‖ / ‖(d_1..d_k)‖`` for every block (equal to
    :func:`graft` on the whole layer); ``per="block"``: ``u_i = (‖a_i‖/‖d_i‖)·d_i``.
    """
    check_granularity(per)
    if len(d_blocks) != len(a_blocks):
        raise ValueError(f"a_blocks: expected {len(d_blocks)} blocks like d_blocks, got {len(a_blocks)}")
    if per == "block":
        return [graft(xp, d, a) for d, a in zip(d_blocks, a_blocks)]
    s = graft_scale(xp, norm_of_blocks(xp, a_blocks), norm_of_blocks(xp, d_blocks))
    return [d * s for d in d_blocks]


def has_accumulator(kind: str) -> bool:
    """Whether direction ``kind`` keeps an accumulator ``A`` (the shape of the param)."""
    return kind in _WITH_ACCUMULATOR


def direction(xp, kind: str, g, acc, t: int, *, b2: float = 0.999, eps: float = 1e-8, g_norm=None):
    """``(a, new_acc)`` for step ``t`` (1-based); see the table in the module docstring.

    ``acc`` is the accumulator (``None`` for ``"sgd"`` and ``"sqrt_n"``, returned as is).
    ``g_norm``: for ``"rmsprop_normalized"``, the ``‖g‖`` that normalises ``g`` (default:
    :func:`norm` of the whole array; block-local grafting passes each entry's block norm).
    """
    check_direction(kind)
    if kind == "sgd":
        return g, acc
    if kind == "sqrt_n":
        return xp.sign(g), acc
    if acc is None:
        raise ValueError(f"acc: graft {kind!r} needs its accumulator (zeros at the first step)")
    if kind == "rmsprop_normalized":
        n = norm(xp, g) if g_norm is None else g_norm
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


@dataclass(frozen=True)
class GraftingConfig:
    r"""The grafted first-order direction ``u_g`` (from the raw gradient ``g``).

    - ``none``: ``u_g = g`` and the Shampoo direction is *not* rescaled;
    - ``sgd``: ``u_g = g``;
    - ``adagrad``: ``D += g²``, ``u_g = g/(√D + eps)``;
    - ``rmsprop``: ``D = b2 D + (1-b2) g²``, ``u_g = g/(√D + eps)`` (no bias correction);
    - ``rmsprop_normalized``: rmsprop on ``g/‖g‖`` (per layer);
    - ``adam``: rmsprop with bias correction ``√(D/(1-b2^t))`` (Adam's second moment;
      the first moment is Shampoo's momentum);
    - ``sqrt_n``: ``u_g = sign(g)`` (norm ``√n``).

    The directions, norms and zero guard are :mod:`arrayopt.grafting`'s. With
    ``per="layer"`` the Shampoo direction ``d`` of a layer is rescaled to
    ``‖u_g‖/‖d‖ · d`` (one norm per parameter, over all its blocks); with
    ``per="block"`` each block ``d_i`` to ``‖u_g,i‖/‖d_i‖ · d_i`` (Meta's
    ``distributed_shampoo``). ``u = 0`` where ``‖d‖ = 0``.
    """

    type: str = "adam"
    b2: float = 0.999
    eps: float = 1e-8
    per: str = "layer"

    def __post_init__(self):
        _validate.check_choice("graft", self.type, GRAFT_TYPES)
        check_granularity(self.per)
        object.__setattr__(self, "b2", _validate.check_real("graft_b2", self.b2, 0.0, 1.0, high_open=True))
        object.__setattr__(self, "eps", _validate.check_real("graft_eps", self.eps, 0.0))

    @property
    def has_state(self) -> bool:
        return self.type in GRAFT_WITH_STATE


def as_grafting(graft: Any, b2: float, eps: float, per: str = "layer") -> GraftingConfig:
    """``graft`` as a :class:`GraftingConfig` (a string picks the type; b2/eps/per are the defaults)."""
    if isinstance(graft, GraftingConfig):
        return graft
    if isinstance(graft, str):
        return GraftingConfig(graft, b2, eps, per)
    if graft is None:
        return GraftingConfig("none", b2, eps, per)
    raise TypeError(f"graft: expected a GraftingConfig or one of {list(GRAFT_TYPES)}, got {type(graft).__name__}")
