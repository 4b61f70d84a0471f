"""Shampoo configuration: frozen, validated dataclasses (named errors at construction).

``ShampooConfig`` holds every hyperparameter of :func:`arrayopt.shampoo.shampoo`
(its graft is an :class:`arrayopt.grafting.GraftingConfig`, shared with Sketchy). It
validates in ``__post_init__`` and raises ``ValueError``/``TypeError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .. import _validate
from ..grafting import GRAFT_TYPES, GraftingConfig

__all__ = ["ShampooConfig", "PRECONDITIONER_TYPES", "ROOT_METHODS", "PRECONDITIONERS"]

PRECONDITIONER_TYPES = ("all", "input", "output")
ROOT_METHODS = ("eigh", "newton", "qr")
PRECONDITIONERS = ("root_inverse", "eigenvalue_corrected")


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return v


@dataclass(frozen=True)
class ShampooConfig:
    """Every Shampoo hyperparameter; see :func:`arrayopt.shampoo.shampoo` for their meaning."""

    learning_rate: float | Callable = 1e-3
    block_size: int = 1024
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    exponent_override: int = 0
    precondition_every: int = 1
    statistics_every: int = 1
    start_preconditioning_step: int = 1
    root_method: str = "eigh"
    root_dtype: str = "float64"
    graft: GraftingConfig = GraftingConfig()
    nesterov: bool = True
    ema_momentum: bool = False
    weight_decay: float = 0.0
    merge_small_dims: int | None = None
    skip_preconditioning_dim_size_gt: int | None = 4096
    skip_preconditioning_rank_lt: int = 1
    preconditioner_type: str = "all"
    relative_epsilon: bool = True
    inverse_failure_threshold: float = 0.1
    ridge_retries: int = 0
    root_delay: int | None = None
    preconditioner: str = "root_inverse"
    eigen_b2: float | None = None
    qr_iterations: int = 1
    qr_tolerance: float = 0.01

    def __post_init__(self):
        s = object.__setattr__
        s(self, "learning_rate", _validate.check_learning_rate(self.learning_rate))
        s(self, "block_size", _validate.check_int("block_size", self.block_size, 1))
        s(self, "b1", _validate.check_real("b1", self.b1, 0.0, 1.0, high_open=True))
        s(self, "b2", _validate.check_real("b2", self.b2, 0.0, 1.0, low_open=True))
        # eps > 0: with a zero ridge the factors of the first steps (rank-deficient sums of g gᵀ)
        # have no inverse root, so every root would fail
        s(self, "eps", _validate.check_real("eps", self.eps, 0.0, low_open=True))
        s(self, "exponent_override", _validate.check_int("exponent_override", self.exponent_override, 0))
        s(self, "precondition_every", _validate.check_int("precondition_every", self.precondition_every, 1))
        s(self, "statistics_every", _validate.check_int("statistics_every", self.statistics_every, 1))
        s(self, "start_preconditioning_step",
          _validate.check_int("start_preconditioning_step", self.start_preconditioning_step, 1))
        _validate.check_choice("root_method", self.root_method, ROOT_METHODS)
        _validate.check_choice("root_dtype", self.root_dtype, ("float64", "float32"))
        if not isinstance(self.graft, GraftingConfig):
            raise TypeError(f"graft: expected a GraftingConfig or one of {list(GRAFT_TYPES)}, "
                            f"got {type(self.graft).__name__}")
        _bool("nesterov", self.nesterov)
        _bool("ema_momentum", self.ema_momentum)
        _bool("relative_epsilon", self.relative_epsilon)
        if self.nesterov and self.b1 == 0.0:
            s(self, "nesterov", False)  # Nesterov with no momentum is plain momentum-free SGD
        s(self, "weight_decay", _validate.check_real("weight_decay", self.weight_decay, 0.0))
        if self.merge_small_dims is not None:
            s(self, "merge_small_dims", _validate.check_int("merge_small_dims", self.merge_small_dims, 1))
        if self.skip_preconditioning_dim_size_gt is not None:
            s(self, "skip_preconditioning_dim_size_gt",
              _validate.check_int("skip_preconditioning_dim_size_gt", self.skip_preconditioning_dim_size_gt, 1))
        s(self, "skip_preconditioning_rank_lt",
          _validate.check_int("skip_preconditioning_rank_lt", self.skip_preconditioning_rank_lt, 0))
        _validate.check_choice("preconditioner_type", self.preconditioner_type, PRECONDITIONER_TYPES)
        s(self, "inverse_failure_threshold",
          _validate.check_real("inverse_failure_threshold", self.inverse_failure_threshold, 0.0, low_open=True))
        s(self, "ridge_retries", _validate.check_int("ridge_retries", self.ridge_retries, 0))
        if self.root_delay is not None:
            s(self, "root_delay", _validate.check_int("root_delay", self.root_delay, 0))
        _validate.check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        if self.eigen_b2 is not None:
            s(self, "eigen_b2", _validate.check_real("eigen_b2", self.eigen_b2, 0.0, 1.0, low_open=True))
        s(self, "qr_iterations", _validate.check_int("qr_iterations", self.qr_iterations, 1))
        s(self, "qr_tolerance", _validate.check_real("qr_tolerance", self.qr_tolerance, 0.0))
        if self.eigenvalue_corrected:
            if self.root_method == "newton":
                raise ValueError("root_method: 'newton' computes inverse roots; preconditioner='eigenvalue_corrected' "
                                 "needs eigenbases, use 'eigh' or 'qr'")
            if self.exponent_override:
                raise ValueError("exponent_override: preconditioner='eigenvalue_corrected' divides by the square "
                                 "root of its second moment; the override applies to root_inverse only")
        if self.exponent_override and self.root_method == "newton" and not float(self.exponent_override).is_integer():
            raise ValueError("exponent_override: root_method='newton' needs an integer exponent")

    @property
    def eigenvalue_corrected(self) -> bool:
        return self.preconditioner == "eigenvalue_corrected"

    @property
    def uses_bases(self) -> bool:
        """Whether the state keeps eigenbases (eigenvalue correction, or roots from QR-refreshed bases)."""
        return self.eigenvalue_corrected or self.root_method == "qr"

    @property
    def corrected_b2(self) -> float:
        """β₂ of the second moment in the eigenbasis (``eigen_b2``, default ``b2``)."""
        return self.b2 if self.eigen_b2 is None else self.eigen_b2

    @property
    def merge_threshold(self) -> int:
        return self.block_size if self.merge_small_dims is None else self.merge_small_dims

    def delay(self, asynchronous: bool) -> int:
        """Steps between a root job's statistics and the step that first uses its roots."""
        if self.root_delay is not None:
            return self.root_delay
        return 1 if asynchronous else 0
