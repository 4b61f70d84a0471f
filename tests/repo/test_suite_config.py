"""How the suite runs: CI runs the README's command; long property runs are marked slow."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_long_property_runs_are_marked_slow():
    import test_sketchy_regret_contrast
    import test_sonew
    import test_sonew_band_kernels as kb

    for fn in (test_sonew.test_float32_rank_one_gradients_tiny_eps_10k_steps_stay_finite,
               test_sonew.test_bfloat16_rank_one_gradients_stay_finite,
               test_sketchy_regret_contrast.test_s_adagrad_regret_grows_like_sqrt_t_and_fixed_delta_ada_fd_does_not):
        assert "slow" in [m.name for m in getattr(fn, "pytestmark", [])], fn.__name__
    slow_cases = {tuple(c.values) for c in kb.CASES
                  if hasattr(c, "marks") and any(m.name == "slow" for m in c.marks)}
    assert {(b, "float32") for b in range(5, 9)} <= slow_cases
    fast_cases = {c for c in kb.CASES if not hasattr(c, "marks")}
    assert {(2, "float32"), (3, "float32"), (4, "float32"), (2, "float64")} <= fast_cases


def test_ci_runs_exactly_the_readme_test_command_and_nothing_skips_slow_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = 'pip install ".[test]" && python -m pytest'
    assert ci.rstrip().endswith(command)
    assert f"```bash\n{command}\n```" in readme
    assert "pytest_collection_modifyitems" not in (ROOT / "tests" / "conftest.py").read_text()
