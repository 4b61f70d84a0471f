"""The frozen description of eigenvalue-corrected Shampoo's elementwise step (what a backend receives).

Per block, after the rotation ``Ĝ = G ×_j Q_jᵀ`` (matrix products through the namespace), with
the second moment ``D`` in the eigenbasis (``docs/shampoo.md``, Q1):

.. math::
    D ← w_1 D + w_2\\, Ĝ^{∘2},\\qquad X = Ĝ / (\\sqrt{c\\, D} + ε)

``w₁ = β``, ``w₂ = 1 − β``, ``c = 1/(1 − β^t)``; the running sum (``β = 1``) has
``w₁ = w₂ = c = 1``. ``X`` is then rotated back. Multiplying by 1 is exact, so one formula
serves both cases bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CorrectedMomentStep", "corrected_moment_step"]


@dataclass(frozen=True)
class CorrectedMomentStep:
    """``D ← decay·D + weight·Ĝ²``, ``X = Ĝ/(√(inv_bias·D) + eps)`` at one step (see the module doc)."""

    decay: float
    weight: float
    inv_bias: float
    eps: float


def corrected_moment_step(b2: float, t: int, eps: float) -> CorrectedMomentStep:
    """The description of step ``t`` (1-based) for second-moment decay ``b2`` (1: running sum)."""
    if b2 == 1.0:
        return CorrectedMomentStep(1.0, 1.0, 1.0, eps)
    return CorrectedMomentStep(b2, 1.0 - b2, 1.0 / (1.0 - b2 ** t), eps)
