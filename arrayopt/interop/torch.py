"""PyTorch adapters (re-exports): ``Optimizer``, a ``torch.optim.Optimizer`` over any arrayopt optimizer."""

from ._torch_optimizer import Optimizer

__all__ = ["Optimizer"]
