"""Named optimizers with tuned defaults, used by the main job and the benchmarks.

An algorithm module registers its optimizer once::

    register("adam", lambda **kw: adam(**{"learning_rate": 3e-3, **kw}), "Adam (torch.optim.Adam math)")

``registered()`` lists them in registration order.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

__all__ = ["Registered", "register", "registered", "make"]


@dataclass(frozen=True)
class Registered:
    name: str
    factory: Callable  # (**overrides) -> Optimizer with tuned defaults
    description: str


# name -> frozen Registered; written only under _lock (check and insert as one step), read
# as a copy, so concurrent register/registered/make calls are safe
_REGISTRY: dict = {}
_lock = threading.Lock()


def register(name: str, factory: Callable, description: str = "") -> None:
    if not isinstance(name, str) or not name:
        raise ValueError("name: expected a non-empty string")
    with _lock:
        if name in _REGISTRY:
            raise ValueError(f"name: optimizer {name!r} is already registered")
        _REGISTRY[name] = Registered(name, factory, description)


def registered() -> dict:
    """name -> :class:`Registered`, in registration order."""
    return dict(_REGISTRY)


def make(name: str, **overrides):
    """A registered optimizer with its tuned defaults (``overrides`` replace them)."""
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown optimizer {name!r}; registered: {list(_REGISTRY)}")
    return _REGISTRY[name].factory(**overrides)
