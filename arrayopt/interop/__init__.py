"""Adapters to training frameworks, imported on attribute access (``ao.interop.torch``,
``ao.interop.jax``), so that importing arrayopt imports no framework."""

from __future__ import annotations

import importlib

_SUBMODULES = ("torch", "jax")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
