"""JAX adapters."""

from ._jax_capture import loss_grads_and_stats

__all__ = ["loss_grads_and_stats"]
