"""``shampoo(...)``: the factory of :class:`arrayopt.shampoo.optimizer.Shampoo` (every
hyperparameter, its default and its meaning)."""

from __future__ import annotations

from typing import Any

from ..grafting import as_grafting
from .config import ShampooConfig
from .optimizer import Shampoo

__all__ = ["shampoo"]


def shampoo(learning_rate=1e-3, block_size: int = 1024, b1: float = 0.9, b2: float = 0.999,
            eps: float = 1e-6, exponent_override: int = 0, precondition_every: int = 1,
            statistics_every: int = 1, start_preconditioning_step: int = 1, root_method: str = "eigh",
            graft: Any = "adam", executor=None, *, graft_b2: float | None = None,
            graft_eps: float = 1e-8, graft_per: str = "layer", nesterov: bool = True, ema_momentum: bool = False,
            weight_decay: float = 0.0, root_dtype: str = "float64", merge_small_dims: int | None = None,
            skip_preconditioning_dim_size_gt: int | None = 4096, skip_preconditioning_rank_lt: int = 1,
            preconditioner_type: str = "all", relative_epsilon: bool = True,
            inverse_failure_threshold: float = 0.1, ridge_retries: int = 0, root_delay: int | None = None, comm=None,
            on_nonfinite: str = "raise", preconditioner: str = "root_inverse", eigen_b2: float | None = None,
            qr_iterations: int = 1, qr_tolerance: float = 0.01) -> Shampoo:
    """Shampoo (see the module docstring for the math).

    Args:
      learning_rate: float or schedule ``count -> float``.
      block_size: dims longer than this are cut into blocks of this size.
      b1: momentum (heavy-ball; EMA with ``ema_momentum=True``); 0 disables it.
      b2: factor statistics decay; ``1.0`` is the AdaGrad-style running sum.
      eps: ridge of the roots (> 0), relative to ``λmax`` (absolute if ``relative_epsilon=False``).
      exponent_override: ``p`` of every root (``-1/p``); 0 means ``2 × #preconditioned dims``.
      precondition_every: roots every this many steps (``F``).
      statistics_every: the factor statistics take the gradient only on steps ``t`` with
        ``t % statistics_every == 0`` (JAX's ``statistics_compute_steps``); untouched otherwise.
      start_preconditioning_step: first step (1-based) that computes roots; before
        the first roots are installed the grafting direction is used alone.
      root_method: ``"eigh"`` (host, ``root_dtype``), ``"newton"`` (coupled Newton,
        falling back to eigh, then to the previous root) or ``"qr"`` (eigenbases by
        ``qr_iterations`` QR iterations warm-started from the previous basis, skipped when
        ``‖B − diag(B)‖_F ≤ qr_tolerance·‖B‖_F`` for ``B = QᵀFQ``; the first refresh is exact eigh;
        root-inverse roots are ``Q diag((λ + ridge)^{-1/p}) Qᵀ`` with ``λ = diag(B)``).
      preconditioner: ``"root_inverse"`` (the roots above) or ``"eigenvalue_corrected"``
        (SOAP-style: only the eigenbases ``Q_j`` of the factors are refreshed; every step
        ``Ĝ = G ×_j Q_jᵀ``, ``D ← β D + (1-β) Ĝ²`` with ``β = eigen_b2`` (default ``b2``; a running
        sum when 1), and the direction is ``(Ĝ / (√(D/(1-β^t)) + eps)) ×_j Q_j``; ``eps`` is then
        this additive ε).
      ridge_retries: with ``root_method="newton"``, a failed root is retried at ridge
        ``eps·10^i`` for ``i = 1..ridge_retries`` before the eigh fallback (JAX's escalation).
      graft: ``"none"``, ``"sgd"``, ``"adagrad"``, ``"rmsprop"``, ``"rmsprop_normalized"``,
        ``"adam"``, ``"sqrt_n"`` or a :class:`GraftingConfig` (``graft_b2``/``graft_eps``).
      graft_per: ``"layer"`` (one graft norm per parameter) or ``"block"`` (per block, as
        Meta's ``distributed_shampoo``); see :mod:`arrayopt.grafting`.
      executor: a ``concurrent.futures.Executor`` for asynchronous host roots.
      comm: a communicator (:mod:`arrayopt.shampoo.distributed`) to spread roots over ranks.
      root_delay: steps from a root job's statistics to the step that uses its roots
        (default 0 synchronous, 1 with an executor).
      merge_small_dims: merge threshold (default ``block_size``).
      skip_preconditioning_dim_size_gt: params with a dim above this use the grafting
        direction only (None: never).
      preconditioner_type: ``"all"``, ``"input"`` (all but the last dim) or ``"output"`` (last dim).
    """
    if graft_b2 is None:
        graft_b2 = b2 if isinstance(b2, (int, float)) and 0.0 <= b2 < 1.0 else 0.999
    g = as_grafting(graft, graft_b2, graft_eps, graft_per)
    cfg = ShampooConfig(
        learning_rate=learning_rate, block_size=block_size, b1=b1, b2=b2, eps=eps,
        exponent_override=exponent_override, precondition_every=precondition_every,
        statistics_every=statistics_every, start_preconditioning_step=start_preconditioning_step,
        root_method=root_method,
        root_dtype=root_dtype, graft=g, nesterov=nesterov, ema_momentum=ema_momentum,
        weight_decay=weight_decay, merge_small_dims=merge_small_dims,
        skip_preconditioning_dim_size_gt=skip_preconditioning_dim_size_gt,
        skip_preconditioning_rank_lt=skip_preconditioning_rank_lt,
        preconditioner_type=preconditioner_type, relative_epsilon=relative_epsilon,
        inverse_failure_threshold=inverse_failure_threshold, ridge_retries=ridge_retries, root_delay=root_delay,
        preconditioner=preconditioner, eigen_b2=eigen_b2, qr_iterations=qr_iterations, qr_tolerance=qr_tolerance)
    return Shampoo(cfg, executor=executor, comm=comm, on_nonfinite=on_nonfinite)

