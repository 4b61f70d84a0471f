"""Shampoo's fused tail (the backend's ``sketchy`` op after the directions, ``d = R_L G R_R`` or the
eigenvalue-corrected one: graft norms, momentum, weight decay, param write) against the reference step.

Float64 within 1e-12 and float32 within 1e-5 of the reference, normwise per leaf, for params and
state; a step the kernel cannot take (per-block grafting of a leaf of several blocks, a graft
without a kernel code, a non-finite direction) runs the reference and writes nothing on failure.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import arrayopt as ao
from arrayopt import dispatch
from arrayopt.shampoo import tree_step

pytest.importorskip("numba")

#: a conv weight, a matrix of two blocks at block_size 128, a bias, a scalar, a leaf skipped for size
SHAPES = {"conv": (8, 3, 3, 3), "w": (40, 30), "multi": (300, 20), "bias": (7,), "scalar": (), "skip": (600, 2)}
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _tree(lib, seed, dtype, scale=1.0):
    rng = np.random.default_rng(seed)
    out = {k: np.asarray(scale * rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}
    if lib == "torch":
        torch = pytest.importorskip("torch", reason="torch is not installed")
        return {k: torch.from_numpy(v) for k, v in out.items()}
    return out


def _np(x):
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def _run(lib, backend, kw, dtype, steps=4):
    opt = ao.shampoo(block_size=128, skip_preconditioning_dim_size_gt=512, **kw)
    params = _tree(lib, 0, dtype)
    state = opt.init(params)
    with dispatch.use_backend(backend):
        for t in range(steps):
            params, state = opt.step(params, _tree(lib, t + 1, dtype), state)
    return {k: _np(v) for k, v in params.items()}, state


def _close(got, want, tol, what):
    err = np.linalg.norm(got - want)
    assert err <= tol * max(np.linalg.norm(want), np.finfo(want.dtype).tiny), f"{what}: {err:.3g}"


def _count_tail_calls(monkeypatch):
    from arrayopt.backends.numba_cpu import sketchy as kernels

    calls = []
    run = kernels.run
    monkeypatch.setattr(kernels, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    return calls


CONFIGS = st.fixed_dictionaries({
    "learning_rate": st.sampled_from([0.01, 0.1]),
    "graft": st.sampled_from(["adam", "rmsprop", "adagrad", "sgd", "none"]),
    "b1": st.sampled_from([0.0, 0.9]),
    "nesterov": st.booleans(),
    "ema_momentum": st.booleans(),
    "weight_decay": st.sampled_from([0.0, 0.05]),
    "precondition_every": st.sampled_from([1, 3]),
    "start_preconditioning_step": st.sampled_from([1, 3]),
    "b2": st.sampled_from([0.99, 1.0]),
    "preconditioner": st.sampled_from(["root_inverse", "eigenvalue_corrected"]),
})


@settings(max_examples=16, deadline=None)
@given(kw=CONFIGS, dtype=st.sampled_from([np.float64, np.float32]), lib=st.sampled_from(["numpy", "torch"]))
def test_fused_tail_matches_the_reference(kw, dtype, lib):
    from arrayopt.backends.numba_cpu import sketchy as kernels

    want_p, want_s = _run(lib, "reference", kw, dtype)
    calls, run = [], kernels.run
    kernels.run = lambda *a, **k: calls.append(1) or run(*a, **k)
    try:
        got_p, got_s = _run(lib, "numba_cpu", kw, dtype)
    finally:
        kernels.run = run
    assert len(calls) == 4  # every step took the kernel
    tol = TOL[dtype]
    for k in SHAPES:
        _close(got_p[k], want_p[k], tol, f"params {k}")
    for name in ("graft", "momentum"):
        for i, (a, b) in enumerate(zip(got_s.get(name, []), want_s.get(name, []))):
            _close(_np(a), _np(b), tol, f"{name}[{i}]")
    for a, b in zip(got_s.get("second_moment", []), want_s.get("second_moment", [])):
        for x, y in zip(a, b):  # the eigenbasis moments: the same kernel or reference in both runs
            _close(_np(x), _np(y), tol, "second_moment")
    for a, b in zip(got_s["stats"], want_s["stats"]):
        for x, y in zip(a, b):
            for u, v in zip(x, y):
                np.testing.assert_array_equal(_np(u), _np(v))
    assert got_s["count"] == want_s["count"] == 4


def _takes_the_reference(monkeypatch, kw, dtype):
    """``kw``'s steps never call the tail kernel and equal the reference's bit for bit."""
    calls = _count_tail_calls(monkeypatch)
    want_p, _ = _run("numpy", "reference", kw, dtype)
    got_p, _ = _run("numpy", "numba_cpu", kw, dtype)
    assert calls == []
    for k in SHAPES:
        np.testing.assert_array_equal(got_p[k], want_p[k])
    return calls


def test_per_block_grafting_of_a_leaf_of_several_blocks_takes_the_reference(monkeypatch):
    calls = _takes_the_reference(monkeypatch, dict(learning_rate=0.1, graft_per="block"), np.float64)
    # one block per preconditioned leaf: one norm per block is one per leaf, and the kernel runs
    opt = ao.shampoo(learning_rate=0.1, graft_per="block", block_size=128)
    p = {"w": np.ones((40, 30))}
    s = opt.init(p)
    with dispatch.use_backend("numba_cpu"):
        opt.step(p, {"w": np.full((40, 30), 0.5)}, s)
    assert calls == [1]


def test_a_graft_without_a_kernel_code_takes_the_reference(monkeypatch):
    _takes_the_reference(monkeypatch, dict(learning_rate=0.1, graft="rmsprop_normalized"), np.float32)
    ex = ao.explain(ao.shampoo(graft="rmsprop_normalized"), {"w": np.ones((4, 3), np.float32)},
                    {"w": np.ones((4, 3), np.float32)})
    assert ex.backend == "reference" and "graft" in ex.reason


@pytest.mark.parametrize("preconditioner", ["root_inverse", "eigenvalue_corrected"])
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_a_nonfinite_direction_writes_nothing(monkeypatch, on_nonfinite, preconditioner):
    """A direction with NaN (finite gradients): the tail kernel does not run, the non-finite update
    is reported (raised, or the step skipped and counted), and params, graft accumulators and
    momentum keep their bits."""
    calls = _count_tail_calls(monkeypatch)
    opt = ao.shampoo(learning_rate=0.1, block_size=128, on_nonfinite=on_nonfinite, preconditioner=preconditioner)
    params = _tree("numpy", 0, np.float32)
    state = opt.init(params)
    with dispatch.use_backend("numba_cpu"):
        params, state = opt.step(params, _tree("numpy", 1, np.float32), state)
    assert calls == [1]
    before_p = {k: v.copy() for k, v in params.items()}
    before = {n: [a.copy() for a in state[n]] for n in ("graft", "momentum")}
    directions = tree_step.directions

    def poisoned(*a, **k):
        out, moments = directions(*a, **k)
        out[0] = out[0] * np.float32(np.nan)
        return out, moments

    monkeypatch.setattr(tree_step, "directions", poisoned)
    with dispatch.use_backend("numba_cpu"):
        if on_nonfinite == "raise":
            with pytest.raises(ValueError, match="update leaf"):
                opt.step(params, _tree("numpy", 2, np.float32), state)
        else:
            _, new_state = opt.step(params, _tree("numpy", 2, np.float32), state)
            assert new_state["nonfinite_skipped"] == state["nonfinite_skipped"] + 1
    assert calls == [1]
    for k in SHAPES:
        np.testing.assert_array_equal(params[k], before_p[k])
    for n in ("graft", "momentum"):
        for a, b in zip(state[n], before[n]):
            np.testing.assert_array_equal(a, b)


def test_explain_names_the_tail_kernel():
    p = {"w": np.zeros((8, 6), np.float32)}
    ex = ao.explain(ao.shampoo(), p, p)
    assert ex.backend == "numba_cpu" and ex.op == "sketchy"
