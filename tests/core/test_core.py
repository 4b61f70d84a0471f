"""Trees, schedules, chain/transforms, state size, registry and backend reporting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import arrayopt as ao
from arrayopt import _tree


def test_tree_flatten_round_trip_and_paths():
    tree = {"enc": [np.ones(2), (np.zeros(1), np.ones(3))], "b": np.ones(4)}
    leaves, td, paths = _tree.flatten(tree)
    assert paths == ["['enc'][0]", "['enc'][1][0]", "['enc'][1][1]", "['b']"]
    back = _tree.unflatten(td, leaves)
    assert isinstance(back["enc"][1], tuple) and back["enc"][1][1] is tree["enc"][1][1]
    assert _tree.flatten(np.ones(2))[2] == ["<root>"]


def test_schedules_values():
    s = ao.schedules
    assert s.constant(0.1)(5) == 0.1
    w = s.linear_warmup(1.0, 10, init_value=0.1)
    assert w(0) == pytest.approx(0.1) and w(5) == pytest.approx(0.55) and w(10) == 1.0 and w(99) == 1.0
    c = s.cosine_decay(2.0, 100, alpha=0.1)
    assert c(0) == pytest.approx(2.0) and c(100) == pytest.approx(0.2) and c(200) == pytest.approx(0.2)
    assert c(50) == pytest.approx(2.0 * (0.9 * 0.5 + 0.1))
    p = s.piecewise_constant(1.0, {10: 0.5, 20: 0.1})
    assert [p(0), p(10), p(25)] == [1.0, 0.5, pytest.approx(0.05)]
    j = s.join([s.linear_warmup(1.0, 10), s.cosine_decay(1.0, 90)], [10])
    assert j(0) == 0.0 and j(10) == 1.0 and j(100) == pytest.approx(0.0, abs=1e-12)
    # NumPy integer scalars count as ints (hyperparameters and the step)
    assert s.cosine_decay(2.0, np.int64(100), alpha=0.1)(np.int64(50)) == c(50)
    assert s.linear_warmup(1.0, np.int32(10), init_value=0.1)(np.uint8(5)) == pytest.approx(0.55)


@pytest.mark.parametrize("bad,err,regex", [
    (lambda: ao.schedules.linear_warmup(1.0, 0), ValueError, "warmup_steps: must be >= 1"),
    (lambda: ao.schedules.cosine_decay(1.0, 10, alpha=2.0), ValueError, "alpha: must be <= 1"),
    (lambda: ao.schedules.constant(-1.0), ValueError, "value: must be >= 0"),
    (lambda: ao.schedules.join([ao.schedules.constant(1.0)], [3]), ValueError, "boundaries: expected 0"),
    (lambda: ao.schedules.piecewise_constant(1.0, {-1: 0.5}), ValueError, "must be >= 0"),
    (lambda: ao.schedules.constant(1.0)(-1), ValueError, "step: expected an int >= 0"),
])
def test_schedule_errors(bad, err, regex):
    with pytest.raises(err, match=regex):
        bad()


def test_schedule_returning_bad_value_is_rejected_without_touching_state():
    opt = ao.adam(learning_rate=lambda t: float("nan") if t == 1 else 0.1)
    p = {"w": np.ones(3, np.float32)}
    s = opt.init(p)
    p, s = opt.step(p, {"w": np.ones(3, np.float32)}, s)
    mu = s["mu"][0].copy()
    with pytest.raises(ValueError, match="learning_rate: schedule returned nan at step 1"):
        opt.step(p, {"w": np.ones(3, np.float32)}, s)
    assert np.array_equal(s["mu"][0], mu) and s["count"] == 1


def test_chain_clip_then_adam_equals_manual_clipping():
    g = {"w": np.array([3.0, 4.0]), "b": np.array([12.0])}  # global norm 13
    p = {"w": np.zeros(2), "b": np.zeros(1)}
    chained = ao.chain(ao.clip_by_global_norm(1.0), ao.adam(0.1))
    plain = ao.adam(0.1)
    u1, s1 = chained.update(g, chained.init(p), p)
    u2, _ = plain.update({k: v / 13.0 for k, v in g.items()}, plain.init(p), p)
    for k in p:
        np.testing.assert_allclose(u1[k], u2[k], rtol=1e-12)
    assert s1["count"] == 1 and s1["inner"][1]["count"] == 1
    p2, s2 = chained.step(p, g, s1)
    assert s2["count"] == 2 and p2["w"] is p["w"]


def test_chain_skip_stops_later_stages():
    opt = ao.chain(ao.scale(2.0, on_nonfinite="skip"), ao.adam(0.1))
    p = {"w": np.ones(2)}
    s = opt.init(p)
    u, s = opt.update({"w": np.array([np.nan, 1.0])}, s, p)
    assert s["nonfinite_skipped"] == 1 and s["count"] == 0 and s["inner"][1]["count"] == 0
    assert not np.any(u["w"])
    with pytest.raises(TypeError, match="chain: argument 0"):
        ao.chain("adam")
    with pytest.raises(ValueError, match="max_norm: must be > 0"):
        ao.clip_by_global_norm(0.0)


@given(shape=st.lists(st.integers(1, 5), max_size=3).map(tuple), dtype=st.sampled_from(["float32", "float64"]))
def test_state_nbytes_counts_every_array(shape, dtype):
    p = {"w": np.ones(shape, dtype)}
    n = int(np.prod(shape))
    itemsize = np.dtype(dtype).itemsize
    assert ao.state_nbytes(ao.adam().init(p)) == 2 * n * itemsize
    assert ao.state_nbytes(ao.sgd(0.1).init(p)) == 0
    assert ao.state_nbytes(ao.sgd(0.1, momentum=0.9).init(p)) == n * itemsize


def test_state_nbytes_bfloat16_params_hold_float32_state():
    torch = pytest.importorskip("torch", reason="bfloat16 needs torch")
    s = ao.adam().init({"w": torch.ones(10, dtype=torch.bfloat16)})
    assert ao.state_nbytes(s) == 2 * 10 * 4


def test_registry_and_backends_report():
    names = list(ao.registry.registered())
    assert names[:4] == ["sgd", "adam", "adamw", "adagrad"]
    assert isinstance(ao.registry.make("adam"), ao.Optimizer)
    with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
        ao.registry.make("nope")
    with pytest.raises(ValueError, match="already registered"):
        ao.registry.register("adam", ao.adam)
    b = ao.dispatch

    status = b.status()
    assert set(status) >= {"numba_cpu", "cupy_cuda"}
    assert status["numba_cpu"][0] is True
    with ao.dispatch.use_backend("reference"):
        assert b.available() == []
    with pytest.raises(ValueError, match="use_backend: unknown backend"):
        with ao.dispatch.use_backend("tpu"):
            pass


def test_env_var_forces_reference(monkeypatch):
    monkeypatch.setenv("ARRAYOPT_BACKEND", "reference")
    assert ao.dispatch.forced_backend() == "reference"
    b = ao.dispatch

    assert b.available() == []


def test_update_without_params_and_weight_decay_needs_params():
    g = {"w": np.ones(3)}
    u, _ = ao.adam(0.1).update(g, ao.adam(0.1).init(g))
    assert math.isclose(float(u["w"][0]), -0.1, rel_tol=1e-6)
    opt = ao.adamw(0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match="params: adamw with weight decay needs the params"):
        opt.update(g, opt.init(g))
