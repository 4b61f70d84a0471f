"""Adapters for code that lives in a framework's training loop.

- ``arrayopt.interop.torch.Optimizer(params, opt)``: a ``torch.optim.Optimizer``.
- ``arrayopt.interop.torch.KVCapture(model)``: Eva's layer statistics from torch hooks.
- ``arrayopt.interop.jax.loss_grads_and_stats(...)``: the same for a JAX function.
- ``arrayopt.interop.optax.transform(opt)``: an ``optax.GradientTransformation``.

The submodules import their framework when first used (``arrayopt.interop.torch`` on
attribute access); importing ``arrayopt`` imports neither torch nor JAX. How each adapter
works: ``docs/interop.md``.
"""

import importlib as _importlib

_SUBMODULES = ("torch", "jax", "optax")


def __getattr__(name):
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
