"""Learning-rate schedules: callables ``step -> float`` (``step`` counts from 0).

Any ``learning_rate`` argument accepts one of these (or any callable of the step).

>>> from arrayopt import schedules
>>> s = schedules.join([schedules.linear_warmup(1e-3, 100), schedules.cosine_decay(1e-3, 900)], [100])
>>> round(s(0), 6), round(s(100), 6), round(s(1000), 6)
(0.0, 0.001, 0.0)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

from ._validate import check_int, check_real

__all__ = ["constant", "linear_warmup", "cosine_decay", "piecewise_constant", "join", "array_value"]


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    return int(step)


@dataclass(frozen=True)
class constant:
    """``η(t) = value``."""

    value: float

    def __post_init__(self):
        check_real("value", self.value, 0.0)

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(self.value)

    def array_at(self, xp, count, dtype):
        return xp.full_like(xp.astype(count, dtype), float(self.value))


@dataclass(frozen=True)
class linear_warmup:
    """Linear ramp from ``init_value`` at step 0 to ``peak_value`` at ``warmup_steps``, then constant."""

    peak_value: float
    warmup_steps: int
    init_value: float = 0.0

    def __post_init__(self):
        check_real("peak_value", self.peak_value, 0.0)
        check_real("init_value", self.init_value, 0.0)
        check_int("warmup_steps", self.warmup_steps, 1)

    def __call__(self, step: int) -> float:
        frac = min(_check_step(step), self.warmup_steps) / self.warmup_steps
        return float(self.init_value + frac * (self.peak_value - self.init_value))

    def array_at(self, xp, count, dtype):
        frac = xp.minimum(xp.astype(count, dtype), float(self.warmup_steps)) / float(self.warmup_steps)
        return self.init_value + frac * (self.peak_value - self.init_value)


@dataclass(frozen=True)
class cosine_decay:
    r"""``η(t) = η_0 ((1-α) \tfrac12 (1 + \cos(π \min(t, T)/T)) + α)``."""

    init_value: float
    decay_steps: int
    alpha: float = 0.0

    def __post_init__(self):
        check_real("init_value", self.init_value, 0.0)
        check_int("decay_steps", self.decay_steps, 1)
        check_real("alpha", self.alpha, 0.0, 1.0)

    def __call__(self, step: int) -> float:
        t = min(_check_step(step), self.decay_steps) / self.decay_steps
        cos = 0.5 * (1.0 + math.cos(math.pi * t))
        return float(self.init_value * ((1.0 - self.alpha) * cos + self.alpha))

    def array_at(self, xp, count, dtype):
        t = xp.minimum(xp.astype(count, dtype), float(self.decay_steps)) / float(self.decay_steps)
        cos = 0.5 * (1.0 + xp.cos(math.pi * t))
        return self.init_value * ((1.0 - self.alpha) * cos + self.alpha)


@dataclass(frozen=True)
class piecewise_constant:
    """``init_value`` times the product of ``scales[b]`` for every boundary ``b <= step``."""

    init_value: float
    boundaries_and_scales: dict

    def __post_init__(self):
        check_real("init_value", self.init_value, 0.0)
        if not isinstance(self.boundaries_and_scales, dict):
            raise TypeError("boundaries_and_scales: expected a dict {step: scale}")
        for b, s in self.boundaries_and_scales.items():
            check_int(f"boundaries_and_scales key {b!r}", b, 0)
            check_real(f"boundaries_and_scales[{b}]", s, 0.0)

    def __call__(self, step: int) -> float:
        _check_step(step)
        v = float(self.init_value)
        for b in sorted(self.boundaries_and_scales):
            if step >= b:
                v *= self.boundaries_and_scales[b]
        return v

    def array_at(self, xp, count, dtype):
        v = xp.full_like(xp.astype(count, dtype), float(self.init_value))
        for b in sorted(self.boundaries_and_scales):
            v = xp.where(count >= b, v * self.boundaries_and_scales[b], v)
        return v


@dataclass(frozen=True)
class join:
    """Run ``schedules[i]`` from ``boundaries[i-1]`` on, with its step counted from that boundary."""

    schedules: Sequence[Callable[[int], float]]
    boundaries: Sequence[int]

    def __post_init__(self):
        if len(self.schedules) == 0 or not all(callable(s) for s in self.schedules):
            raise TypeError("schedules: expected a non-empty sequence of callables")
        if len(self.boundaries) != len(self.schedules) - 1:
            raise ValueError(
                f"boundaries: expected {len(self.schedules) - 1} boundaries for "
                f"{len(self.schedules)} schedules, got {len(self.boundaries)}")
        prev = 0
        for b in self.boundaries:
            check_int("boundaries", b, prev)
            prev = b

    def __call__(self, step: int) -> float:
        _check_step(step)
        start = 0
        idx = 0
        for i, b in enumerate(self.boundaries):
            if step >= b:
                idx, start = i + 1, b
        return float(self.schedules[idx](step - start))

    def array_at(self, xp, count, dtype):
        v = array_value(self.schedules[0], xp, count, dtype)
        for s, b in zip(self.schedules[1:], self.boundaries):
            v = xp.where(count >= b, array_value(s, xp, count - b, dtype), v)
        return v


def array_value(learning_rate, xp, count, dtype):
    """A learning rate (float or schedule) at a 0-d integer array ``count``, as a 0-d ``dtype``
    array computed by array ops (so a traced step can take it from a traced count). The
    schedules here use ``array_at``; any other callable is called with ``count`` and must
    accept an array (optax's schedules do)."""
    if not callable(learning_rate):
        return xp.full_like(xp.astype(count, dtype), float(learning_rate))
    at = getattr(learning_rate, "array_at", None)
    value = at(xp, count, dtype) if at is not None else learning_rate(count)
    return xp.astype(xp.asarray(value), dtype)
