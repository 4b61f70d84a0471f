"""The frozen description of one Sketchy step: what a backend receives instead of the optimizer.

Built by :meth:`arrayopt.sketchy.Sketchy.step_description` with the learning rate of the
schedule at this step and the graft's bias correction ``bc2 = 1 - β₂ᵗ`` (Adam graft);
the low-rank directions ``D`` (two skinny products through the namespace) travel next
to it, since they are computed from the state, not options.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SketchyStep"]


@dataclass(frozen=True)
class SketchyStep:
    """One Sketchy step after the low-rank apply: the graft ``graft`` (a direction of
    :mod:`arrayopt.grafting`, ``"none"`` for ``u = D``) with its ``graft_b2``, ``graft_eps`` and
    ``graft_bc2 = 1 - β₂ᵗ``; heavy-ball momentum ``b1`` (``ema``, ``nesterov``), decoupled
    ``weight_decay`` and ``lr`` resolved for this step."""

    lr: float
    graft: str
    graft_b2: float
    graft_eps: float
    graft_bc2: float
    b1: float
    ema: bool
    nesterov: bool
    weight_decay: float
