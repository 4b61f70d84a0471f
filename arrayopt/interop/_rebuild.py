"""Copies of an arrayopt optimizer with some hyperparameters changed (a torch param group's
``lr`` and overrides such as ``weight_decay=0.0``).

An optimizer keeps its constructor's arguments (``opt.init_args``); :func:`rebuild` calls
the constructor again with some of them changed, so the copy is validated like any new
optimizer. Chains and partitions are rebuilt part by part.
"""

from __future__ import annotations

import dataclasses
import inspect

from .. import _validate
from ..base import Optimizer
from ..chain import Chain
from ..groups import Partition


def _composite_parts(opt: Optimizer) -> list | None:
    if isinstance(opt, Chain):
        return list(opt.parts)
    if isinstance(opt, Partition):
        return list(opt.transforms.values())
    return None


def arguments(opt: Optimizer) -> dict:
    """The constructor's arguments of ``opt`` by name, defaults included (a ``config``
    dataclass, as Shampoo's, contributes its fields)."""
    args, kwargs = opt.init_args
    bound = inspect.signature(type(opt).__init__).bind(None, *args, **kwargs)
    bound.apply_defaults()
    out = dict(list(bound.arguments.items())[1:])
    config = out.get("config")
    if dataclasses.is_dataclass(config):
        out.update({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    return out


def rebuild(opt: Optimizer, changes_for) -> Optimizer:
    """``opt`` made again with ``changes_for(arguments(part))`` applied to each non-composite part."""
    parts = _composite_parts(opt)
    if isinstance(opt, Chain):
        return Chain(*[rebuild(p, changes_for) for p in parts])
    if isinstance(opt, Partition):
        return Partition(opt.labels, {k: rebuild(p, changes_for) for k, p in opt.transforms.items()},
                         on_nonfinite=opt.on_nonfinite)
    changes = changes_for(arguments(opt))
    if not changes:
        return opt
    args, kwargs = opt.init_args
    bound = inspect.signature(type(opt).__init__).bind(None, *args, **kwargs)
    config = bound.arguments.get("config")
    if dataclasses.is_dataclass(config):
        fields = {f.name for f in dataclasses.fields(config)}
        in_config = {k: v for k, v in changes.items() if k in fields}
        bound.arguments["config"] = dataclasses.replace(config, **in_config)
        changes = {k: v for k, v in changes.items() if k not in fields}
    bound.arguments.update(changes)
    return type(opt)(*bound.args[1:], **bound.kwargs)


def own_rates(opt: Optimizer) -> list:
    """The ``learning_rate`` (float or schedule) of every part of ``opt`` that has one."""
    parts = _composite_parts(opt)
    if parts is not None:
        return [r for p in parts for r in own_rates(p)]
    args = arguments(opt)
    return [args["learning_rate"]] if "learning_rate" in args else []


def single_rate(opt: Optimizer) -> float | None:
    """The float all parts of ``opt`` share as their learning rate, or ``None`` (a schedule, or several)."""
    rates = own_rates(opt)
    if rates and all(not callable(r) for r in rates) and len(set(rates)) == 1:
        return float(rates[0])
    return None


def hyperparameter_names(opt: Optimizer) -> set:
    """The hyperparameters some part of ``opt`` has, by name."""
    parts = _composite_parts(opt)
    if parts is not None:
        return set().union(*(hyperparameter_names(p) for p in parts))
    return set(arguments(opt))


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
