"""One declarative record per optimizer; the generic tests run over all of them.

A later optimizer gets the generic tests (convergence, bad inputs with state
unchanged, save/load, update vs step, parity across namespaces and backends) by
adding an ``OptimizerRecord`` to ``RECORDS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import arrayopt as ao


@dataclass(frozen=True)
class OptimizerRecord:
    name: str
    factory: Callable
    configs: tuple                      # valid hyperparameter dicts (the first is the default)
    invalid: tuple                      # (kwargs, error type, regex matching the message)
    rtol: dict = field(default_factory=lambda: {"float64": 1e-12, "float32": 2e-5, "bfloat16": 2e-2, "float16": 5e-3})
    atol: dict = field(default_factory=lambda: {"float64": 1e-14, "float32": 1e-6, "bfloat16": 1e-2, "float16": 1e-3})
    converge_steps: int = 300           # steps on the convex test problem
    converge_factor: float = 1e-2       # final loss must be below factor * initial loss
    torch_class: str | None = None      # torch.optim class with the same math
    torch_kwargs: Callable | None = None  # config -> torch.optim kwargs
    # the hypothesis sweep over namespaces and backends (tests/test_parity.py); a composite whose
    # parts have records of their own sets False and tests its plumbing on one tree instead, and so
    # does an optimizer whose JAX path compiles per drawn shape, with a fixed-tree parity test of its
    # own over the same contenders (Sketchy: tests/test_sketchy_parity.py)
    namespace_sweep: bool = True

    def ids(self):
        return [f"{self.name}-{i}" for i in range(len(self.configs))]


def _sgd_torch(c):
    return dict(lr=c["learning_rate"], momentum=c.get("momentum", 0.0), nesterov=c.get("nesterov", False),
                weight_decay=c.get("weight_decay", 0.0))


def _adam_torch(c):
    return dict(lr=c["learning_rate"], betas=(c.get("b1", 0.9), c.get("b2", 0.999)), eps=c.get("eps", 1e-8),
                weight_decay=c.get("weight_decay", 0.0))


def _adagrad_torch(c):
    return dict(lr=c["learning_rate"], eps=c.get("eps", 1e-10),
                initial_accumulator_value=c.get("initial_accumulator_value", 0.0),
                weight_decay=c.get("weight_decay", 0.0))


_BAD_LR = (
    ({"learning_rate": -1.0}, ValueError, "learning_rate: must be >= 0"),
    ({"learning_rate": float("nan")}, ValueError, "learning_rate: must be finite"),
    ({"learning_rate": "0.1"}, TypeError, "learning_rate: expected a real number"),
)

RECORDS = (
    OptimizerRecord(
        "sgd", ao.sgd,
        configs=(
            {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
            {"learning_rate": 0.1},
            {"learning_rate": 0.05, "momentum": 0.5, "weight_decay": 1e-3},
        ),
        invalid=_BAD_LR + (
            ({"learning_rate": 0.1, "momentum": 1.0}, ValueError, "momentum: must be < 1"),
            ({"learning_rate": 0.1, "momentum": -0.1}, ValueError, "momentum: must be >= 0"),
            ({"learning_rate": 0.1, "momentum": 0.0, "nesterov": True}, ValueError, "nesterov: .*momentum > 0"),
            ({"learning_rate": 0.1, "momentum": 0.9, "nesterov": 1}, TypeError, "nesterov: expected a bool"),
            ({"learning_rate": 0.1, "weight_decay": -1e-3}, ValueError, "weight_decay: must be >= 0"),
            ({"learning_rate": 0.1, "on_nonfinite": "ignore"}, ValueError, "on_nonfinite: must be one of"),
        ),
        torch_class="SGD", torch_kwargs=_sgd_torch,
    ),
    OptimizerRecord(
        "adam", ao.adam,
        configs=(
            {"learning_rate": 0.05},
            {"learning_rate": 0.05, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 1e-2},
            {"learning_rate": ao.schedules.cosine_decay(0.05, 400, alpha=0.1)},
        ),
        invalid=_BAD_LR + (
            ({"b1": 1.0}, ValueError, "b1: must be < 1"),
            ({"b2": -0.5}, ValueError, "b2: must be >= 0"),
            ({"eps": -1e-8}, ValueError, "eps: must be >= 0"),
            ({"eps": float("inf")}, ValueError, "eps: must be finite"),
            ({"weight_decay": -1.0}, ValueError, "weight_decay: must be >= 0"),
        ),
        torch_class="Adam", torch_kwargs=_adam_torch,
    ),
    OptimizerRecord(
        "adamw", ao.adamw,
        configs=(
            {"learning_rate": 0.05, "weight_decay": 1e-2},
            {"learning_rate": 0.05, "b1": 0.5, "weight_decay": 0.1},
        ),
        invalid=_BAD_LR + (
            ({"b1": 1.5}, ValueError, "b1: must be < 1"),
            ({"weight_decay": -1.0}, ValueError, "weight_decay: must be >= 0"),
        ),
        torch_class="AdamW", torch_kwargs=_adam_torch,
    ),
    OptimizerRecord(
        "adagrad", ao.adagrad,
        configs=(
            {"learning_rate": 0.5},
            {"learning_rate": 0.5, "eps": 1e-6, "initial_accumulator_value": 0.1, "weight_decay": 1e-3},
        ),
        invalid=_BAD_LR + (
            ({"eps": -1.0}, ValueError, "eps: must be >= 0"),
            ({"initial_accumulator_value": -0.1}, ValueError, "initial_accumulator_value: must be >= 0"),
        ),
        torch_class="Adagrad", torch_kwargs=_adagrad_torch,
    ),
)


def _collect_more(records):
    """Records of other optimizers live in their tests folder, ``tests/<area>/records_<algorithm>.py``
    (each defines ``RECORDS``)."""
    import importlib
    import pathlib

    for path in sorted(pathlib.Path(__file__).parent.parent.glob("*/records_*.py")):
        records += tuple(importlib.import_module(path.stem).RECORDS)
    return records


RECORDS = _collect_more(RECORDS)
CASES = [(r, c) for r in RECORDS for c in r.configs]
CASE_IDS = [i for r in RECORDS for i in r.ids()]
