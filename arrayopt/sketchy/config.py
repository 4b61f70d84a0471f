"""Sketchy configuration: a frozen, validated dataclass (named errors at construction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import _validate
from .math import TAIL_DECAYS
from ..grafting import GraftingConfig

__all__ = ["SketchyConfig"]


def _bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return v


@dataclass(frozen=True)
class SketchyConfig:
    """Every Sketchy hyperparameter; see :func:`arrayopt.sketchy.sketchy` for their meaning."""

    learning_rate: float | Callable = 1e-3
    rank: int = 128
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-7
    relative_eps: bool = True
    tail_decay: str = "beta2"
    update_every: int = 1
    start_preconditioning_step: int = 1
    graft: GraftingConfig = GraftingConfig("rmsprop", 0.999, 1e-8)
    nesterov: bool = True
    ema_momentum: bool = False
    weight_decay: float = 0.0
    merge_small_dims: int = 1024
    skip_preconditioning_dim_size_gt: int | None = 4096
    skip_preconditioning_rank_lt: int = 1

    def __post_init__(self):
        s = object.__setattr__
        s(self, "learning_rate", _validate.check_learning_rate(self.learning_rate))
        s(self, "rank", _validate.check_int("rank", self.rank, 1))
        s(self, "b1", _validate.check_real("b1", self.b1, 0.0, 1.0, high_open=True))
        s(self, "b2", _validate.check_real("b2", self.b2, 0.0, 1.0, low_open=True))
        s(self, "eps", _validate.check_real("eps", self.eps, 0.0))
        _bool("relative_eps", self.relative_eps)
        _validate.check_choice("tail_decay", self.tail_decay, TAIL_DECAYS)
        s(self, "update_every", _validate.check_int("update_every", self.update_every, 1))
        s(self, "start_preconditioning_step",
          _validate.check_int("start_preconditioning_step", self.start_preconditioning_step, 1))
        if not isinstance(self.graft, GraftingConfig):
            raise TypeError(f"graft: expected a GraftingConfig or a graft name, got {type(self.graft).__name__}")
        if self.graft.per != "layer":
            raise ValueError("graft_per: Sketchy has no blocks; only 'layer' grafting applies")
        _bool("nesterov", self.nesterov)
        _bool("ema_momentum", self.ema_momentum)
        if self.nesterov and self.b1 == 0.0:
            s(self, "nesterov", False)  # Nesterov with no momentum is plain momentum-free SGD
        s(self, "weight_decay", _validate.check_real("weight_decay", self.weight_decay, 0.0))
        s(self, "merge_small_dims", _validate.check_int("merge_small_dims", self.merge_small_dims, 1))
        if self.skip_preconditioning_dim_size_gt is not None:
            s(self, "skip_preconditioning_dim_size_gt",
              _validate.check_int("skip_preconditioning_dim_size_gt", self.skip_preconditioning_dim_size_gt, 1))
        s(self, "skip_preconditioning_rank_lt",
          _validate.check_int("skip_preconditioning_rank_lt", self.skip_preconditioning_rank_lt, 0))
