"""The learning rate of an arrayopt optimizer, set from outside (a torch param group's ``lr``).

A framework adapter keeps one :class:`GroupRate` per group and rebuilds the group's
optimizer once with :func:`with_learning_rate`; before each step it sets ``value``.
"""

from __future__ import annotations

import dataclasses

from .. import _validate
from ..base import Chain, Optimizer
from ..groups import Partition


class GroupRate:
    """One group's rate ``value``, shared by every part of the group's optimizer: each part steps
    with ``lr_t = value`` (``multiplier=False``: the parts' own rates were one float), or with
    ``lr_t = value · η(t)``, ``η`` the part's own rate or schedule (``multiplier=True``)."""

    def __init__(self, value: float, multiplier: bool):
        self.value = value
        self.multiplier = multiplier

    def rate_for(self, own) -> "_PartRate":
        """The schedule that replaces a part's own rate ``own``."""
        return _PartRate(self, own if self.multiplier else None)


class _PartRate:
    def __init__(self, group: GroupRate, own):
        self.group = group
        self.own = own

    def __call__(self, count: int) -> float:
        if self.own is None:
            return self.group.value
        return self.group.value * _validate.learning_rate_at(self.own, count)


def own_rates(opt: Optimizer) -> list:
    """The ``learning_rate`` (float or schedule) of every part of ``opt`` that has one."""
    if isinstance(opt, Chain):
        return [r for p in opt.parts for r in own_rates(p)]
    if isinstance(opt, Partition):
        return [r for p in opt.transforms.values() for r in own_rates(p)]
    config = opt.__dict__.get("config")
    if dataclasses.is_dataclass(config) and hasattr(config, "learning_rate"):
        return [config.learning_rate]
    if "learning_rate" in opt.__dict__:
        return [opt.learning_rate]
    return []


def single_rate(opt: Optimizer) -> float | None:
    """The float all parts of ``opt`` share as their learning rate, or ``None`` (a schedule, or several)."""
    rates = own_rates(opt)
    if rates and all(not callable(r) for r in rates) and len(set(rates)) == 1:
        return float(rates[0])
    return None


def with_learning_rate(opt: Optimizer, make) -> Optimizer:
    """A copy of ``opt`` whose every ``learning_rate`` ``η`` is replaced by ``make(η)``
    (rebuilt like an unpickled copy: fresh caches, the same frozen hyperparameters otherwise)."""
    if isinstance(opt, Chain):
        return Chain(*[with_learning_rate(p, make) for p in opt.parts])
    if isinstance(opt, Partition):
        return Partition(opt.labels, {k: with_learning_rate(p, make) for k, p in opt.transforms.items()},
                         on_nonfinite=opt.on_nonfinite)
    state = opt.__getstate__()
    config = state.get("config")
    if dataclasses.is_dataclass(config) and hasattr(config, "learning_rate"):
        new_rate = make(config.learning_rate)
        state["config"] = dataclasses.replace(config, learning_rate=new_rate)
    elif "learning_rate" in state:
        new_rate = make(state["learning_rate"])
        state["learning_rate"] = new_rate
    else:
        return opt
    if isinstance(state.get("hyperparams"), dict) and "learning_rate" in state["hyperparams"]:
        state["hyperparams"] = dict(state["hyperparams"], learning_rate=new_rate)
    new = object.__new__(type(opt))
    new.__setstate__(state)
    return new
