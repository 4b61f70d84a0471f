"""The frozen description of one Sketchy step: what a backend receives instead of the optimizer.

Built by :meth:`arrayopt.sketchy.Sketchy.step_description` with the learning rate of the
schedule at this step and the graft's bias correction ``bc2 = 1 - β₂ᵗ`` (Adam graft);
the low-rank directions ``D`` (two skinny products through the namespace) travel next
to it, since they are computed from the state, not options.

The same step after a preconditioned direction ends root-inverse and eigenvalue-corrected Shampoo
too: :func:`tail_step`, :func:`tail_groups`, :func:`tail_keys` and :func:`check_tail_state` serve both.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import _validate
from .._xp import state_dtype

__all__ = ["SketchyStep", "GRAFT_CODES", "tail_step", "tail_groups", "tail_keys", "check_tail_state"]

#: the integer code of each graft direction, as every kernel (Numba and CUDA) reads it:
#: ``sgd`` ``a = g``; ``adagrad`` ``A ← A + g²``; ``rmsprop`` ``A ← β₂A + (1-β₂)g²``; ``adam`` the
#: same ``A`` with ``a = g/(√A/√bc₂ + ε)``; the others ``a = g/(√A + ε)``
GRAFT_CODES = {"sgd": 0, "adagrad": 1, "rmsprop": 2, "adam": 3}


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

    @property
    def graft_code(self) -> int:
        """The graft direction's kernel code (:data:`GRAFT_CODES`); ``"none"`` reads as ``"sgd"``
        (``a = g``, the step of a leaf that is not preconditioned, as in the reference). A graft without a code raises ``ValueError``."""
        direction = "sgd" if self.graft == "none" else self.graft
        try:
            return GRAFT_CODES[direction]
        except KeyError:
            raise ValueError(f"graft={self.graft!r} has no kernel code (codes: {sorted(GRAFT_CODES)})") from None


def tail_step(cfg, count: int) -> SketchyStep:
    """The :class:`SketchyStep` of step ``count + 1`` for a config with ``learning_rate``, ``graft``, ``b1``,
    ``ema_momentum``, ``nesterov`` and ``weight_decay`` (Sketchy's, and Shampoo's for its tail)."""
    g = cfg.graft
    return SketchyStep(lr=_validate.learning_rate_at(cfg.learning_rate, count), graft=g.type, graft_b2=g.b2,
                       graft_eps=g.eps, graft_bc2=1.0 - g.b2 ** (count + 1), b1=cfg.b1, ema=cfg.ema_momentum,
                       nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


def tail_groups(cfg, leaves, g_leaves, state) -> tuple:
    """The per-leaf arrays the step's kernel reads or writes: params, grads, then the graft
    accumulators and momentum buffers where the config keeps them."""
    return (leaves, g_leaves, *([state["graft"]] if cfg.graft.has_state else []),
            *([state["momentum"]] if cfg.b1 > 0 else []))


def tail_keys(cfg) -> list:
    """The state entries of the tail: ``graft`` and ``momentum`` where the config keeps them."""
    return (["graft"] if cfg.graft.has_state else []) + (["momentum"] if cfg.b1 > 0 else [])


def check_tail_state(name: str, cfg, ns, leaves, paths, state, params_missing: bool, keys) -> list:
    """What Sketchy's and Shampoo's state checks share: weight decay needs the params, every entry
    of ``keys`` present (named in that order), the tail's arrays like the params. Returns the state
    dtypes of the leaves."""
    if params_missing and cfg.weight_decay != 0.0:
        raise ValueError(f"params: {name} with weight decay needs the params in update()")
    for k in keys:
        if k not in state:
            raise ValueError(f"state: missing entry {k!r}; was it made by this optimizer's init()?")
    dtypes = [state_dtype(ns.xp, p.dtype) for p in leaves]
    for k in tail_keys(cfg):
        _validate.check_state_leaves(k, state[k], paths, ns, leaves, dtypes)
    return dtypes
