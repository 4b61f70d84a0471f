"""Sketchy on the CUDA backend (``backends/cupy_cuda/sketchy.cu``, driver ``sketchy.py``), with and
without a GPU.

Without one: the ``.cu`` compiles for sm_90 (``test_cupy_cuda.py`` compiles every ``.cu``); its
arithmetic, built for the host, gives the graft direction and its norms; and whole
``ao.sketchy`` steps run through ``CupyCUDA.run("sketchy", ...)`` on a fake ``cupy`` whose kernels
are the host harness, against the reference path. With a CUDA device and CuPy: ``ao.sketchy(...)
.step`` on CuPy arrays takes the kernels and matches the NumPy reference (marked ``gpu``;
skipped here: "needs a CUDA device and cupy").
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao
from arrayopt import dispatch
from arrayopt._xp import resolve
from arrayopt.backends import cupy_cuda
from arrayopt.backends.cupy_cuda import first_order, sketchy
from arrayopt.sketchy.step import GRAFT_CODES, SketchyStep

try:
    from . import _cuda_host_harness as hh
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import _cuda_host_harness as hh

SKETCHY_CU = sketchy.KERNELS.path
needs_nvcc = pytest.mark.skipif(hh.nvcc() is None, reason="nvcc is not on PATH")
needs_cuda = pytest.mark.skipif(not cupy_cuda.BACKEND.available(), reason="needs a CUDA device and cupy")
CONFIGS = [
    {"learning_rate": 0.05, "rank": 2, "graft": "adam", "tail_decay": "sqrt"},
    {"learning_rate": 0.05, "rank": 4, "merge_small_dims": 1, "b2": 1.0, "update_every": 3,
     "start_preconditioning_step": 2, "nesterov": False, "relative_eps": False, "eps": 1e-6},
    {"learning_rate": 0.05, "rank": 1, "graft": "sgd", "b1": 0.5, "ema_momentum": True, "weight_decay": 1e-3,
     "skip_preconditioning_rank_lt": 2},
    {"learning_rate": 0.05, "rank": 3, "graft": "adagrad", "weight_decay": 1e-2, "start_preconditioning_step": 3},
    {"learning_rate": 0.01, "rank": 2, "graft": "none", "b1": 0.0},
]


@pytest.fixture(scope="module")
def sketchy_harness(tmp_path_factory):
    return hh.HostHarness(hh.build_harness(SKETCHY_CU, tmp_path_factory.mktemp("sketchy_harness")))


@needs_nvcc
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("graft,kind", [("sgd", 0), ("adagrad", 1), ("rmsprop", 2), ("adam", 3)])
def test_host_norms_give_the_graft_direction(sketchy_harness, dtype, graft, kind):
    from arrayopt import grafting

    assert GRAFT_CODES[graft] == kind  # the codes both backends read from the step
    rng = np.random.default_rng(1)
    g, d = rng.normal(size=50).astype(dtype), rng.normal(size=50).astype(dtype)
    acc0 = rng.random(50).astype(dtype)
    b2, eps, t = 0.99, 1e-8, 3
    want, acc_want = grafting.direction(np, graft, g, acc0.copy() if kind else None, t, b2=b2, eps=eps)
    acc = acc0.copy()
    part_a, part_d = np.zeros(1), np.zeros(1)
    sketchy_harness.launch("sketchy_norms", dtype, (g, acc, d, np.int64(50), np.int32(kind), dtype(b2),
                                                    dtype(1 - b2), dtype(eps), dtype((1 - b2 ** t) ** 0.5),
                                                    part_a, part_d))
    if kind:
        np.testing.assert_array_equal(acc, acc_want)  # the same IEEE operations
    np.testing.assert_allclose(part_a[0], np.sum(want.astype(np.float64) ** 2), rtol=1e-12)
    np.testing.assert_allclose(part_d[0], np.sum(d.astype(np.float64) ** 2), rtol=1e-12)


def test_step_graft_code_is_the_kernels_code_of_the_direction():
    def step(graft):
        return SketchyStep(lr=0.1, graft=graft, graft_b2=0.999, graft_eps=1e-8, graft_bc2=1e-3, b1=0.0,
                           ema=False, nesterov=False, weight_decay=0.0)

    assert {g: step(g).graft_code for g in GRAFT_CODES} == GRAFT_CODES
    assert step("none").graft_code == GRAFT_CODES["sgd"]  # a graft-only leaf steps with a = g
    for graft in ("sqrt_n", "rmsprop_normalized"):  # not fused: no code
        with pytest.raises(ValueError, match=f"graft='{graft}' has no kernel code"):
            step(graft).graft_code


# ---------------------------------------------------------------- full steps on a fake device


@pytest.fixture
def emulated(sketchy_harness, tmp_path_factory, monkeypatch):
    import sys

    fo = hh.shared_harness(first_order.KERNELS.path, tmp_path_factory)
    launches = []
    monkeypatch.setitem(sys.modules, "cupy", hh.fake_cupy(hh.JoinedHarness(sketchy_harness, fo), launches))
    hh.fresh_loader(monkeypatch)
    backend = hh.emulated_backend()
    monkeypatch.setattr(dispatch, "backends", lambda: [backend])
    return launches


@needs_nvcc
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@pytest.mark.parametrize("k", range(len(CONFIGS)))
def test_emulated_device_steps_match_the_reference(emulated, dtype, tol, k):
    rng = np.random.default_rng(2)
    shapes = {"w": (12, 9), "b": (9,), "c": (3, 2, 4)}
    host = {s: rng.normal(size=v).astype(dtype) for s, v in shapes.items()}
    opt = ao.sketchy(**CONFIGS[k])
    dev = {s: hh.as_fake(v.copy()) for s, v in host.items()}
    state, ref_state, ref = opt.init(dev), opt.init(host), {s: v.copy() for s, v in host.items()}
    for _ in range(4):
        g = {s: rng.normal(size=v).astype(dtype) for s, v in shapes.items()}
        out, state = opt.step(dev, {s: hh.as_fake(v.copy()) for s, v in g.items()}, state)
        assert all(out[s] is dev[s] for s in dev)  # in place, on the device
        with dispatch.use_backend("reference"):
            ref, ref_state = opt.step(ref, g, ref_state)
    kernels = {e.split("<")[0] for e, _, _ in emulated}
    assert "arrayopt::sketchy_write" in kernels
    for s in shapes:
        np.testing.assert_allclose(np.asarray(dev[s]), ref[s], rtol=tol, atol=tol * np.abs(ref[s]).max(),
                                   err_msg=s)
    for key in ("graft", "momentum"):
        for a, b in zip(state.get(key, []), ref_state.get(key, [])):
            np.testing.assert_allclose(np.asarray(a), b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


@needs_nvcc
@pytest.mark.parametrize("scale", [1e200, 1e-170])
def test_emulated_float64_norms_past_float64_squares_take_the_scaled_norm(emulated, scale):
    """Float64 sums of squares that overflow or underflow: the driver takes the scaled norms."""
    from arrayopt import grafting
    rng = np.random.default_rng(3)
    g, d = rng.standard_normal(50) * scale, rng.standard_normal(50) * scale
    p = hh.as_fake(np.zeros(50))
    step = SketchyStep(lr=0.1, graft="sgd", graft_b2=0.999, graft_eps=1e-8, graft_bc2=1e-3, b1=0.0, ema=False,
                       nesterov=False, weight_decay=0.0)
    sketchy.run(hh.emulated_backend(), "sketchy", [p], [hh.as_fake(g)], [None, None, [hh.as_fake(d)]], step)
    want = -0.1 * (d * (grafting.norm(np, g) / grafting.norm(np, d)))
    np.testing.assert_allclose(np.asarray(p), want, rtol=1e-13, atol=0)


# ---------------------------------------------------------------- on a CUDA device


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k", [0, 2])
def test_device_sketchy_step_takes_the_kernels_and_matches_reference(dtype, k):
    import cupy

    rng = np.random.default_rng(5)
    shapes = {"w": (300, 200), "b": (200,), "n": (70_000,)}
    host = {s: rng.normal(size=v).astype(dtype) for s, v in shapes.items()}
    opt = ao.sketchy(**CONFIGS[k])
    params = {s: cupy.asarray(v) for s, v in host.items()}
    state, ref_state, ref = opt.init(params), opt.init(host), {s: v.copy() for s, v in host.items()}
    for _ in range(3):
        g = {s: rng.normal(size=v).astype(dtype) for s, v in shapes.items()}
        leaves, g_leaves = list(params.values()), [cupy.asarray(v) for v in g.values()]
        chosen = dispatch.choose("sketchy", resolve(leaves[0]), opt.step_description(state["count"]),
                                 *opt._kernel_groups(leaves, g_leaves, state))
        assert chosen.backend is cupy_cuda.BACKEND, chosen.reason
        out, state = opt.step(params, {s: cupy.asarray(v) for s, v in g.items()}, state)
        with dispatch.use_backend("reference"):
            ref, ref_state = opt.step(ref, g, ref_state)
    # float32: cuSOLVER's and LAPACK's SVDs differ by rounding (as in the record's tolerances)
    rtol = 1e-8 if dtype == "float64" else 2e-3
    for s in shapes:
        np.testing.assert_allclose(cupy.asnumpy(params[s]), ref[s], rtol=rtol, atol=rtol * np.abs(ref[s]).max(),
                                   err_msg=s)
