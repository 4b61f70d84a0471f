"""How the suite runs: long property runs are marked slow and run only when asked for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import conftest

ROOT = Path(__file__).resolve().parents[1]


class _Item:
    def __init__(self, slow: bool):
        self.keywords = {"slow": True} if slow else {}
        self.added = []

    def add_marker(self, marker):
        self.added.append(marker)


class _Config:
    def __init__(self, run_slow: bool):
        self.run_slow = run_slow

    def getoption(self, name):
        assert name == "--run-slow"
        return self.run_slow


@pytest.mark.parametrize("flag, env, runs", [(False, None, False), (True, None, True),
                                             (False, "1", True), (False, "0", False)])
def test_slow_tests_run_only_when_asked_for(monkeypatch, flag, env, runs):
    if env is None:
        monkeypatch.delenv("ARRAYOPT_RUN_SLOW", raising=False)
    else:
        monkeypatch.setenv("ARRAYOPT_RUN_SLOW", env)
    slow, fast = _Item(True), _Item(False)
    conftest.pytest_collection_modifyitems(_Config(flag), [slow, fast])
    assert fast.added == []
    if runs:
        assert slow.added == []
    else:
        (mark,) = slow.added
        assert mark.name == "skip" and "--run-slow" in mark.kwargs["reason"]


def test_long_property_runs_are_marked_slow():
    import test_sonew
    import test_sonew_band_kernels as kb

    for fn in (test_sonew.test_float32_rank_one_gradients_tiny_eps_10k_steps_stay_finite,
               test_sonew.test_bfloat16_rank_one_gradients_stay_finite):
        assert "slow" in [m.name for m in getattr(fn, "pytestmark", [])], fn.__name__
    slow_cases = {tuple(c.values) for c in kb.CASES
                  if hasattr(c, "marks") and any(m.name == "slow" for m in c.marks)}
    assert {(b, "float32") for b in range(5, 9)} <= slow_cases
    fast_cases = {c for c in kb.CASES if not hasattr(c, "marks")}
    assert {(2, "float32"), (3, "float32"), (4, "float32"), (2, "float64")} <= fast_cases


def test_ci_runs_the_slow_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest --run-slow" in ci
    readme = (ROOT / "README.md").read_text()
    assert "--run-slow" in readme and "python -m pytest" in readme
