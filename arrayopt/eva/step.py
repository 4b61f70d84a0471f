"""The frozen description of one Eva step: what a backend receives instead of the optimizer.

Built by :meth:`arrayopt.eva.Eva.step_description` with the learning rate of the
schedule at this step; the per-layer Kronecker vectors (already refreshed) travel
next to it, since they are state, not options.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EvaStep"]


@dataclass(frozen=True)
class EvaStep:
    """One Eva step: ``lr`` resolved for this step, the SGD-momentum options, ``damping`` (γ),
    ``variant``, ``kl_mode``, ``kl_clip`` (κ), ``weight_layout`` (``"out_in"``: a weight is read as
    ``(d_out, d_in, …)``; ``"in_out"``: as ``(…, d_in, d_out)``; ``None`` for Eva-s, which reads
    every tensor in its own axis order) and ``stat_decay`` (ξ, the weight of the running vectors)."""

    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    damping: float
    variant: str
    kl_mode: str
    kl_clip: float
    weight_layout: str | None = "out_in"
    stat_decay: float = 0.05
