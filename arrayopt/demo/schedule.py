"""The SONew paper's autoencoder learning-rate schedule, per epoch and piecewise constant.

For ``E`` epochs the per-epoch values are::

    concat(linspace(0, lr, 5), linspace(lr, 0, E - 5 + 2)[1:-1])

(``E`` values: lr 0 in the first epoch, a linear warm-up to ``lr`` over epochs 1-4,
then a linear decay to ``lr/(E-4)`` in the last epoch). The paper uses ``E = 100``.
A run of ``T`` steps takes the ``E = 100`` shape compressed onto its steps: step
``s`` gets the value of piece ``floor(s * 100 / T)``, which is exactly the paper's
per-epoch schedule when the run has 100 epochs, and the same shape on a shorter budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PAPER_EPOCHS", "epoch_values", "paper_schedule"]

PAPER_EPOCHS = 100


def epoch_values(lr: float, epochs: int = PAPER_EPOCHS) -> np.ndarray:
    """The ``epochs`` per-epoch learning rates (``epochs >= 5``)."""
    if epochs < 5:
        raise ValueError(f"epochs: the schedule needs at least 5 epochs (5 of warm-up), got {epochs}")
    return np.concatenate([np.linspace(0.0, lr, 5), np.linspace(lr, 0.0, epochs - 5 + 2)[1:-1]])


@dataclass(frozen=True)
class paper_schedule:
    """``η(s)`` for a run of ``total_steps`` steps (``s`` from 0); see the module docstring."""

    lr: float
    total_steps: int

    def __post_init__(self):
        if not self.lr >= 0.0:
            raise ValueError(f"lr: expected a learning rate >= 0, got {self.lr!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps: expected >= 1, got {self.total_steps!r}")
        object.__setattr__(self, "_values", tuple(float(v) for v in epoch_values(self.lr)))

    def __call__(self, step: int) -> float:
        piece = min(int(step) * PAPER_EPOCHS // self.total_steps, PAPER_EPOCHS - 1)
        return self._values[piece]
