"""Training: one optimizer, one run, with the same data order and initial params for all.

:func:`train` runs minibatch training and records

- the minibatch loss of every step, with the cumulative training seconds
  (forward + backward + optimizer step; evaluation is not counted);
- the loss on the full training and test sets before training and after each epoch;
- the same losses minus the entropy of the targets (their floor), for log-scale plots;
- the time spent in ``opt.step`` alone and in whole training steps.

A throw-away warm-up step on copies of the params (:func:`warm_up`) runs first,
so that one-time costs (Numba compilation on a cold cache, cache loading,
first-touch allocations) stay out of the timings; its duration is recorded
separately (``warmup_seconds``). A run whose loss or gradients stop being finite
ends early and is marked ``diverged``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import arrayopt as ao

from . import model

__all__ = ["RunResult", "train", "warm_up", "batches"]


@dataclass
class RunResult:
    name: str
    description: str = ""
    seed: int = 0  # of the initial params and the batch order
    steps: int = 0
    diverged: bool = False
    failed: bool = False  # raised an exception (see ``error``); set by the caller
    error: str = ""
    opt_seconds: float = 0.0    # time inside opt.step
    train_seconds: float = 0.0  # forward + backward + opt.step (+ batch gathering)
    warmup_seconds: float = 0.0  # the untimed warm-up step (kernel compilation on a cold cache)
    state_bytes: int = 0
    step_loss: list = field(default_factory=list)   # minibatch loss at each step
    step_excess: list = field(default_factory=list)  # minibatch loss minus the batch's target entropy
    step_time: list = field(default_factory=list)   # cumulative training seconds after each step
    evals: list = field(default_factory=list)       # dicts: epoch, step, seconds, train_loss, test_loss

    def _last(self, key: str) -> float:
        return self.evals[-1][key] if self.evals else math.nan

    @property
    def final_train_loss(self) -> float:
        return self._last("train_loss")

    @property
    def final_test_loss(self) -> float:
        return self._last("test_loss")

    @property
    def final_train_excess(self) -> float:
        """Final train loss minus the entropy of the targets (its floor; 0 = perfect)."""
        return self._last("train_excess")

    @property
    def final_test_excess(self) -> float:
        return self._last("test_excess")

    @property
    def initial_train_loss(self) -> float:
        return self.evals[0]["train_loss"] if self.evals else math.nan

    @property
    def opt_steps_per_s(self) -> float:
        return self.steps / self.opt_seconds if self.opt_seconds > 0 else math.nan

    @property
    def train_steps_per_s(self) -> float:
        return self.steps / self.train_seconds if self.train_seconds > 0 else math.nan

    def summary(self) -> dict:
        """The scalar results (no histories)."""
        return {
            "optimizer": self.name,
            "description": self.description,
            "seed": self.seed,
            "steps": self.steps,
            "diverged": self.diverged,
            "failed": self.failed,
            "error": self.error,
            "initial_train_loss": self.initial_train_loss,
            "final_train_loss": self.final_train_loss,
            "final_test_loss": self.final_test_loss,
            "final_train_excess": self.final_train_excess,
            "final_test_excess": self.final_test_excess,
            "opt_steps_per_s": self.opt_steps_per_s,
            "train_steps_per_s": self.train_steps_per_s,
            "opt_seconds": self.opt_seconds,
            "train_seconds": self.train_seconds,
            "warmup_seconds": self.warmup_seconds,
            "state_bytes": self.state_bytes,
        }

    def to_dict(self) -> dict:
        return {**self.summary(), "step_loss": self.step_loss, "step_excess": self.step_excess,
                "step_time": self.step_time,
                "evals": self.evals}


def batches(n: int, batch_size: int, rng: np.random.Generator):
    """Index arrays of one shuffled epoch; the incomplete last batch is dropped."""
    perm = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
        yield perm[i:i + batch_size]


def _copy(params: dict) -> dict:
    return {k: v.copy() for k, v in params.items()}


def _loss_and_grads(opt, params: dict, x: np.ndarray):
    """``(loss, grads, step keywords)``: the layer statistics for the optimizers that read them
    (Eva and Eva-f; Eva-s uses the gradients only)."""
    if getattr(opt, "takes_stats", False) and getattr(opt, "variant", None) != "eva_s":
        value, grads, stats = model.loss_grads_and_stats(params, x)
        return value, grads, {"stats": stats}
    value, grads = model.loss_and_grads(params, x)
    return value, grads, {}


def warm_up(opt, params0: dict, x_batch: np.ndarray) -> float:
    """One throw-away step of ``opt`` on copies of ``params0``; returns its seconds.

    It compiles the kernels the run will use (on a cold Numba cache: seconds to a
    minute, once per machine) or loads them from the cache, so that the timed run
    and any progress rate measure training only.
    """
    t0 = time.perf_counter()
    warm = _copy(params0)
    _, g, stats = _loss_and_grads(opt, warm, x_batch)
    opt.step(warm, g, opt.init(warm), **stats)
    return time.perf_counter() - t0


def train(name: str, opt, params0: dict, train_x: np.ndarray, test_x: np.ndarray, *,
          epochs: int, batch_size: int, seed: int, description: str = "",
          on_step: Callable[[int, float], None] | None = None, warmup: bool = True) -> RunResult:
    """Train a copy of ``params0`` with ``opt``; ``params0`` is left untouched.

    ``seed`` fixes the minibatch order, so every optimizer sees the same batches.
    ``on_step(step, loss)`` is called after every step (for a progress bar).
    ``warmup=False`` skips :func:`warm_up` (for a caller that ran it already).
    """
    if batch_size > train_x.shape[0]:
        raise ValueError(f"batch_size: {batch_size} is larger than the {train_x.shape[0]} training images")
    result = RunResult(name=name, description=description)
    params = _copy(params0)
    if warmup:  # compilation and first-call costs are not timed
        result.warmup_seconds = warm_up(opt, params0, train_x[:batch_size])

    state = opt.init(params)
    rng = np.random.default_rng(seed)
    clock = 0.0
    entropy = model.target_entropy(train_x)
    floor_train, floor_test = float(entropy.mean()), float(model.target_entropy(test_x).mean())

    def evaluate(epoch: int) -> None:
        tr, te = model.loss(params, train_x), model.loss(params, test_x)
        result.evals.append({"epoch": epoch, "step": result.steps, "seconds": clock,
                             "train_loss": tr, "test_loss": te,
                             "train_excess": tr - floor_train, "test_excess": te - floor_test})

    # a diverging run is detected (non-finite loss) and reported, not warned about
    with np.errstate(over="ignore", invalid="ignore"):
        evaluate(0)
        for epoch in range(1, epochs + 1):
            for idx in batches(train_x.shape[0], batch_size, rng):
                t0 = time.perf_counter()
                xb = train_x[idx]
                value, grads, stats = _loss_and_grads(opt, params, xb)
                if not math.isfinite(value):
                    result.diverged, result.error = True, f"non-finite loss at step {result.steps + 1}"
                    break
                t1 = time.perf_counter()
                try:
                    params, state = opt.step(params, grads, state, **stats)
                except ValueError as e:  # non-finite gradients
                    if "finite" not in str(e):
                        raise
                    result.diverged, result.error = True, f"step {result.steps + 1}: {e}"
                    break
                t2 = time.perf_counter()
                result.opt_seconds += t2 - t1
                result.train_seconds += t2 - t0
                clock = result.train_seconds
                result.steps += 1
                result.step_loss.append(value)
                result.step_excess.append(value - float(entropy[idx].mean()))
                result.step_time.append(clock)
                if on_step is not None:
                    on_step(result.steps, value)
            if result.diverged:
                break
            evaluate(epoch)
        if result.diverged:
            evaluate(epoch)
    result.state_bytes = int(ao.state_nbytes(state))
    return result
