r"""Heavy-ball momentum and decoupled weight decay after a preconditioned, grafted direction ``u``.

.. math::
    m \leftarrow β_1 m + w_1 u;\quad v = w_1 u + β_1 m \ \text{(Nesterov) or } m;\quad
    Δ = -η (v + λ W)

with ``w_1 = 1 - β₁`` for an EMA (``ema=True``) else 1 (the "trace" of JAX's
Shampoo and tearfree). Shampoo and Sketchy share it.
"""

from __future__ import annotations

__all__ = ["heavy_ball_update"]


def heavy_ball_update(xp, u, m, p32, *, b1: float, ema: bool, nesterov: bool, weight_decay: float, lr: float):
    """``(Δ, m_new)``: the update of one leaf and its new momentum (``m = None`` when ``b1 = 0``).

    ``p32`` is the param in the state dtype (used only when ``weight_decay != 0``).
    """
    w1 = (1.0 - b1) if ema else 1.0
    uw = u * w1 if w1 != 1.0 else u
    if b1 > 0:
        m = m * b1 + uw
        v = uw + m * b1 if nesterov else m
    else:
        v = u
    if weight_decay != 0.0:
        v = v + p32 * weight_decay
    return v * (-lr), m
