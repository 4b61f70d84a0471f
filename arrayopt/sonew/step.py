r"""The frozen description of one SONew step: what the reference and every backend read.

:class:`SONewStep` holds the hyperparameters of an :class:`arrayopt.sonew.SONew`
resolved for one step ``t`` (1-based): the learning rate of the schedule at
``t - 1`` and the bias corrections ``bc1 = 1 - β₁ᵗ``, ``bc2 = 1 - β₂ᵗ``, next to
the options. The optimizer builds it once per step (:meth:`SONew.step_description`);
backends receive it instead of the optimizer, so a kernel driver never reads the
optimizer's attributes and never recomputes a derived quantity:

.. math::
    τ = \text{tau\_factor}\cdot u_{\text{dtype}}\quad(u = 2^{-24}\ \text{float32},\ 2^{-53}\ \text{float64})

    ε_{\rm eff} = \max(ε\,\|\hat H\|_{∞,\rm band},\ ε_{\min})\ \text{(relative)},\qquad ε\ \text{(absolute)}

>>> from arrayopt.sonew.step import SONewStep
>>> s = SONewStep(lr=0.1, bc1=0.1, bc2=0.001, b1=0.9, b2=0.999, band=1)
>>> s.omb1, s.tau("float32") == 4 * 2.0 ** -24
(0.09999999999999998, True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["SONewStep", "UNIT_ROUNDOFF", "GRAFT_CODES"]

#: the integer code of each graft, as every kernel (Numba and CUDA) reads it from the step
GRAFT_CODES = {"none": 0, "adam": 1, "sgd": 2, "momentum": 3, "rmsprop_normalized": 4}

#: unit roundoff of each compute dtype (float16/bfloat16 compute in float32)
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float64": 2.0 ** -53}


@dataclass(frozen=True)
class SONewStep:
    """One SONew step (see the module docstring); built by ``SONew.step_description(count)``.

    ``lr``, ``bc1``, ``bc2`` are Python floats on the host paths; under ``jax.jit``
    the reference replaces them with traced scalars (:meth:`with_scalars`).
    """

    lr: Any
    bc1: Any
    bc2: Any
    b1: float
    b2: float
    band: int
    eps: float = 1e-6
    eps_min: float = 1e-30
    relative_eps: bool = True
    tau_factor: float = 4.0
    graft: str = "adam"
    graft_eps: float = 1e-8
    weight_decay: float = 0.0
    order: str = "C"                       # "C": last axis fastest; "F": first axis fastest
    block_size: int | None = None          # block-local: band, ε and graft norms per block (S10)
    small_param_fallback: str = "sonew"    # "adam": tensors with ndim <= 1 take the Adam direction

    @property
    def graft_code(self) -> int:
        """The graft's kernel code (:data:`GRAFT_CODES`)."""
        return GRAFT_CODES[self.graft]

    @property
    def omb1(self):
        """``1 - β₁`` (the momentum's gradient weight)."""
        return 1.0 - self.b1

    @property
    def omb2(self):
        """``1 - β₂`` (the statistics' gradient weight)."""
        return 1.0 - self.b2

    def effective_band(self, n: int) -> int:
        """The half-bandwidth a tensor of ``n`` entries steps with: ``band`` capped at ``span - 1``
        (``span``: its block, ``min(block_size, n)``, or ``n``), and at least ``min(band, 1)``. Pairs
        farther apart are never in one block, so their statistics stay zero (decayed by ``β₂``) and
        the step equals the step of that band; the reference and the kernels both run that one."""
        span = n if self.block_size is None else min(self.block_size, n)
        return max(min(self.band, span - 1), min(self.band, 1))

    def tau(self, dtype) -> float:
        """The Schur-complement threshold factor ``τ`` for compute dtype ``dtype``."""
        from .._xp import dtype_name

        name = dtype if isinstance(dtype, str) else dtype_name(dtype)
        return self.tau_factor * UNIT_ROUNDOFF.get(name, UNIT_ROUNDOFF["float32"])

    def eps_effective(self, xp, rowmax):
        """``ε_eff``: ``max(ε·rowmax, ε_min)`` with ``rowmax = ‖Ĥ‖_{∞,band}`` (relative), else ``ε``.

        ``rowmax`` is a 0-d array (or NumPy scalar) of the compute dtype; the result
        keeps its dtype (``ε`` is a weak Python float).
        """
        if not self.relative_eps:
            return self.eps
        return xp.clip(rowmax * self.eps, min=self.eps_min)

    def with_scalars(self, lr, bc1, bc2) -> "SONewStep":
        """The same step with other per-step scalars (traced ones under ``jax.jit``)."""
        return dataclasses.replace(self, lr=lr, bc1=bc1, bc2=bc2)
