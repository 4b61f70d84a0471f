"""The backend contract: frozen step descriptions, capabilities in one place, reasons, explain()."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

import arrayopt as ao
from arrayopt import dispatch
from arrayopt.sonew.step import SONewStep

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")


class RecordingBackend:
    """A backend that takes NumPy float arrays, records each step description, and runs the
    Numba kernels (or, for ops it does not delegate, nothing)."""

    name = "recording"
    ops = frozenset({"adam", "sonew"})
    capabilities = {"adam": {}, "sonew": {"graft": frozenset({"adam", "none"})}}

    def __init__(self):
        self.steps = []

    def available(self):
        return True

    def reason(self):
        return "test backend"

    def refuse_arrays(self, ns, *groups):
        return None if ns.library == "numpy" else "NumPy only"

    def refuse_options(self, op, step):
        return dispatch.check_capabilities(self.capabilities, op, step)

    def views(self, arrays):
        return [a.reshape(-1) for a in arrays]

    def all_finite(self, views):
        return all(bool(np.isfinite(v).all()) for v in views)

    def run(self, op, params, grads, states, step, g_views=None):
        self.steps.append((op, step))
        from arrayopt.backends.numba_cpu import BACKEND

        return BACKEND.run(op, params, grads, states, step, g_views)


@pytest.fixture
def recording(monkeypatch):
    dispatch.backends()  # load the built-in ones first
    monkeypatch.setattr(dispatch, "_BACKENDS", list(dispatch._BACKENDS))
    b = RecordingBackend()
    dispatch.register_backend(b)
    return b


def test_backends_available_lists_registered_backends(recording):
    assert "recording" in ao.backends_available()
    assert ao.dispatch.status()["recording"] == (True, "test backend")
    with dispatch.use_backend("recording"):
        assert ao.backends_available() == ["recording"]


def test_register_backend_checks_the_protocol():
    class Half:
        name = "half"
        ops = frozenset()

    with pytest.raises(TypeError, match="does not implement the Backend protocol .*capabilities"):
        dispatch.register_backend(Half())
    assert isinstance(RecordingBackend(), dispatch.Backend)


@needs_numba
def test_backends_receive_a_frozen_step_description_never_the_optimizer(recording):
    p = {"w": np.ones((6, 5), np.float32)}
    g = {"w": np.full((6, 5), 0.5, np.float32)}
    opt = ao.sonew(0.1, band=2, weight_decay=0.01)
    st = opt.init(p)
    with dispatch.use_backend("recording"):
        p, st = opt.step(p, g, st)
        p, st = opt.step(p, g, st)
    (op1, s1), (op2, s2) = recording.steps
    assert op1 == op2 == "sonew"
    assert isinstance(s1, SONewStep) and not isinstance(s1, ao.Optimizer)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s1.lr = 1.0
    assert (s1.lr, s1.band, s1.weight_decay, s1.bc1) == (0.1, 2, 0.01, pytest.approx(0.1))
    assert s2.bc1 == pytest.approx(1 - 0.9 ** 2) and s2 == opt.step_description(1)
    # same bits as the built-in Numba backend
    q = {"w": np.ones((6, 5), np.float32)}
    sq = opt.init(q)
    with dispatch.use_backend("numba_cpu"):
        for _ in range(2):
            q, sq = opt.step(q, g, sq)
    np.testing.assert_array_equal(p["w"], q["w"])
    # first-order ops receive their step scalars
    a = ao.adam(0.1)
    sa = a.init(q)
    with dispatch.use_backend("recording"):
        a.step(q, g, sa)
    assert recording.steps[-1] == ("adam", a.step_scalars(1, 0.1))


def test_options_are_refused_in_one_place_with_a_reason():
    from arrayopt.backends.cupy_cuda import BACKEND as cuda
    from arrayopt.backends.numba_cpu import BACKEND as numba

    def step(**kw):
        return ao.sonew(1e-3, **kw).step_description(0)

    assert numba.refuse_options("sonew", step()) is None
    assert numba.refuse_options("sonew", step(block_size=8, flatten_order="F", band=12)) is None
    assert numba.refuse_options("sonew", step(graft="rmsprop_normalized", small_param_fallback="adam")) is None
    assert "graft='rmsprop_normalized' is not fused" in cuda.refuse_options("sonew", step(graft="rmsprop_normalized",
                                                                                             block_size=None))
    assert cuda.refuse_options("sonew", step(band=32)) is None
    assert cuda.refuse_options("sonew", step(block_size=8, graft="rmsprop_normalized",
                                             small_param_fallback="adam")) is None
    assert "small_param_fallback='adam'" in cuda.refuse_options("sonew", step(small_param_fallback="adam",
                                                                                     block_size=None))
    assert "order='F'" in cuda.refuse_options("sonew", step(flatten_order="F", block_size=None))
    assert "band=33" in cuda.refuse_options("sonew", step(band=33))
    assert numba.refuse_options("adam", ao.adam().step_description(0)) is None


@needs_numba
def test_explain_says_which_path_and_why():
    torch = pytest.importorskip("torch", reason="bfloat16 params")
    f32 = {"w": np.zeros((4, 3), np.float32)}
    e = ao.explain(ao.sonew(1e-3), f32)
    assert e.backend == "numba_cpu" and [lp.backend for lp in e.leaves] == ["numba_cpu"]
    e = ao.explain(ao.sonew(1e-3), {"w": torch.zeros(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16)})
    assert e.backend == "mixed"  # SONew's leaves step on their own paths
    by_path = {lp.path: lp for lp in e.leaves}
    assert "dtype bfloat16" in by_path["['b']"].reason and by_path["['b']"].backend == "reference"
    assert by_path["['w']"].backend == "numba_cpu"
    e = ao.explain(ao.registry.make("sketchy"), {"w": torch.zeros(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16)})
    assert e.backend == "reference"  # one path for all the leaves of an optimizer without per-leaf dispatch
    assert "would take numba_cpu" in {lp.path: lp for lp in e.leaves}["['w']"].reason
    assert "bfloat16" in str(e) and "['b']" in str(e)
    e = ao.explain(ao.sonew(1e-3, graft="rmsprop_normalized"), f32)
    assert e.backend == "numba_cpu"  # fused by the block driver (one block of n)
    e = ao.explain(ao.registry.make("shampoo"), f32)
    assert e.backend == "numba_cpu" and e.op == "sketchy"  # the tail after its directions
    e = ao.explain(ao.chain(ao.clip_by_global_norm(1.0), ao.adam()), f32)
    assert e.backend == "reference" and "a chain runs each part's update()" in e.reason
    with dispatch.use_backend("reference"):
        assert "forced" in ao.explain(ao.adam(), f32).reason
    ro = np.zeros(5, np.float32)
    ro.flags.writeable = False
    assert "read-only" in ao.explain(ao.adam(), {"x": ro}).leaves[0].reason
    with pytest.raises(TypeError, match="opt: expected an arrayopt optimizer"):
        ao.explain(object(), f32)
