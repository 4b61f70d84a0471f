"""PyTorch adapters."""

from ._torch_capture import KVCapture

__all__ = ["KVCapture"]
