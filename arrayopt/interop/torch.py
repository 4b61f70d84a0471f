"""PyTorch adapters (re-exports): ``Optimizer``, a ``torch.optim.Optimizer`` over any arrayopt
optimizer, and ``KVCapture``, Eva's Kronecker-vector statistics from module hooks."""

from ._torch_capture import KVCapture
from ._torch_optimizer import Optimizer

__all__ = ["KVCapture", "Optimizer"]
