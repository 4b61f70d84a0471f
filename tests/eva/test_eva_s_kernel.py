"""Eva-s's fused Numba passes (``backends/numba_cpu/_eva_s.py``) against the NumPy reference step:
float64 within 1e-12 and float32 within 1e-5 normwise per leaf, on leaves that take the parallel
passes, orders 2 to 5, refresh and non-refresh steps, every momentum option; a non-finite or
out-of-range gradient writes nothing; the result does not depend on the thread count."""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao

pytest.importorskip("numba", reason="the Numba backend needs numba")

SHAPES = {"fc": (300, 130), "conv": (64, 32, 3, 3), "seq": (5, 6, 7), "five": (3, 2, 2, 3, 2), "bias": (300,),
          "tall": (4000, 3), "wide": (2, 20000), "tiny": (2, 2)}
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def _run(opt, dtype, backend, steps=4, seed=3):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    state = opt.init(params)
    with ao.dispatch.use_backend(backend):
        for _ in range(steps):
            grads = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
            params, state = opt.step(params, grads, state)
    return params, state


def _close(got, want, tol, what):
    for k in want:
        num = np.linalg.norm(np.asarray(got[k], np.float64) - want[k])
        assert num <= tol * max(np.linalg.norm(want[k]), 1e-300), (what, k, num)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [
    dict(), dict(momentum=0.0), dict(nesterov=True, weight_decay=1e-2), dict(stat_decay=0.9, update_every=2),
    dict(damping=10.0, momentum=0.5), dict(weight_layout="in_out")],
    ids=["default", "no-momentum", "nesterov-wd", "ema-every-2", "damped", "in-out-layout"])
def test_fused_eva_s_matches_the_reference_step(dtype, options):
    opt = ao.eva(0.05, variant="eva_s", **options)
    assert str(ao.explain(opt, *_tree(dtype))).splitlines()[0].endswith("numba_cpu: fused kernel")
    got_p, got_s = _run(opt, dtype, "numba_cpu")
    want_p, want_s = _run(opt, dtype, "reference")
    tol = TOL[dtype]
    _close(got_p, want_p, tol, "params")
    assert ("momentum_buffer" in want_s) == (opt._sgd.momentum != 0)
    if "momentum_buffer" in want_s:
        _close(dict(enumerate(got_s["momentum_buffer"])), dict(enumerate(want_s["momentum_buffer"])), tol,
               "momentum")
    for i, (a, b) in enumerate(zip(got_s["kv_s"], want_s["kv_s"])):
        _close(dict(enumerate(a)), dict(enumerate(b)), tol, f"kv_s leaf {i}")
    assert got_s["kv_updates"] == want_s["kv_updates"] and got_s["count"] == want_s["count"]


def _tree(dtype):
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    return (params,)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_a_bad_gradient_in_a_preconditioned_leaf_writes_nothing(bad, on_nonfinite):
    """NaN/Inf: rejected (or skipped) with nothing written. 1e30 (finite, its square past float32):
    the kernel leaves it to the reference step, whose outcome (here a non-finite update) it gives."""
    opt = ao.eva(0.05, variant="eva_s", on_nonfinite=on_nonfinite)
    params, state = _run(opt, np.float32, "numba_cpu", steps=2)
    before = {k: v.copy() for k, v in params.items()}
    kv_before = [[v.copy() for v in leaf] for leaf in state["kv_s"]]
    mom_before = [m.copy() for m in state["momentum_buffer"]]
    rng = np.random.default_rng(9)
    grads = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads["conv"][40, 3, 1, 2] = bad
    with ao.dispatch.use_backend("numba_cpu"):
        if on_nonfinite == "skip":
            _, new_s = opt.step(params, grads, state)
            assert new_s["nonfinite_skipped"] == state["nonfinite_skipped"] + 1
        else:
            with pytest.raises(ValueError, match=r"\['conv'\]"):
                opt.step(params, grads, state)
    for k in before:
        np.testing.assert_array_equal(params[k], before[k])
    for a, b in zip(state["kv_s"], kv_before):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    for a, b in zip(state["momentum_buffer"], mom_before):
        np.testing.assert_array_equal(a, b)


def test_the_fused_step_does_not_depend_on_the_thread_count():
    import numba

    opt = ao.eva(0.05, variant="eva_s")
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one, _ = _run(opt, np.float32, "numba_cpu")
        numba.set_num_threads(max(2, old))
        many, _ = _run(opt, np.float32, "numba_cpu")
    finally:
        numba.set_num_threads(old)
    for k in one:
        np.testing.assert_array_equal(one[k], many[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norm_of_p_is_exact_where_the_expansion_cancels(dtype):
    """``‖G - o₁uᵀ‖²`` from the expansion where it keeps 1/16 of ``‖G‖²``, from the exact pass where
    ``G`` is nearly ``o₁uᵀ`` (the rank-one direction removed): both within float rounding of NumPy."""
    from arrayopt.backends.numba_cpu import _eva_s

    rng = np.random.default_rng(5)
    o1, u = rng.normal(size=300).astype(dtype), rng.normal(size=70).astype(dtype)
    for G, rel in [(rng.normal(size=(300, 70)).astype(dtype), 1e-6 if dtype == np.float32 else 1e-13),
                   ((np.outer(o1, u) * (1 + 1e-3) + 1e-6 * rng.normal(size=(300, 70))).astype(dtype), 1e-5)]:
        G = np.ascontiguousarray(G)
        G64 = G.astype(np.float64)
        sq = float(np.sum(G64 * G64))
        rowdot = G64 @ u.astype(np.float64)
        want = float(np.sum((G - np.outer(o1, u).astype(dtype)).astype(np.float64) ** 2))
        got = _eva_s._p_sumsq(G, o1, u, sq, rowdot)
        assert abs(got - want) <= rel * want, (got, want)


def test_a_channels_last_weight_takes_the_reference_alone_and_the_others_keep_the_kernel():
    """Eva-s steps each tensor on its own, so its dispatch is per leaf: a ``channels_last`` conv weight
    (not contiguous) takes the reference, the other leaves the kernel, and the step equals the
    reference's. Eva shares the KL factor ``ν`` over its layers: its dispatch stays all-or-nothing."""
    torch = pytest.importorskip("torch", reason="torch is not installed")

    def tree():
        return {"conv": torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last), "fc": torch.randn(10, 40),
                "b": torch.randn(10), "big": torch.randn(300, 200)}

    out = {}
    for backend in ("numba_cpu", "reference"):
        torch.manual_seed(1)
        params = tree()
        opt = ao.eva(0.1, variant="eva_s", weight_decay=0.01)
        state = opt.init(params)
        with ao.dispatch.use_backend(backend):
            if backend == "numba_cpu":
                why = str(ao.explain(opt, params, params, state)).splitlines()
                assert "fused kernel for 3 of 4 leaves" in why[0]
                assert "['conv']" in why[1] and "reference" in why[1]
            for _ in range(3):
                params, state = opt.step(params, {k: torch.randn_like(v) for k, v in params.items()}, state)
        out[backend] = (params, state)
    for k, want in out["reference"][0].items():
        assert float((out["numba_cpu"][0][k] - want).norm()) <= 1e-5 * float(want.norm()), k
    assert out["numba_cpu"][1]["kv_updates"] == out["reference"][1]["kv_updates"]
    assert ao.eva(0.1, variant="eva_s").per_leaf_dispatch and not ao.eva(0.1).per_leaf_dispatch
