"""Eigenvalue-corrected Shampoo's fused eigenbasis moment (``backends/numba_cpu/shampoo.py``) against the
reference (:func:`arrayopt.shampoo.math.corrected_moment`), bit for bit; the whole fused step (moment
and tail) within the kernel rule (float64 1e-12, float32 1e-5 normwise)."""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao
from arrayopt import dispatch
from arrayopt._xp import resolve
from arrayopt.shampoo.math import corrected_moment
from arrayopt.shampoo.step import corrected_moment_step

pytest.importorskip("numba")

PARAMS = {"w": (40, 24), "t": (3, 5, 4), "b": (7,)}


def _run(kw, dtype, backend, steps=4):
    opt = ao.shampoo(learning_rate=0.05, preconditioner="eigenvalue_corrected", merge_small_dims=1, **kw)
    rng = np.random.default_rng(3)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in PARAMS.items()}
    state = opt.init(params)
    with dispatch.use_backend(backend):
        for _ in range(steps):
            grads = {k: rng.standard_normal(s).astype(dtype) for k, s in PARAMS.items()}
            params, state = opt.step(params, grads, state)
    return params, state


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [dict(b2=0.95, root_method="qr", block_size=16, eps=1e-8),
                                dict(b2=1.0, eigen_b2=0.9, b1=0.0, graft="sgd", precondition_every=2),
                                dict(b2=1.0, graft="none", weight_decay=1e-2, start_preconditioning_step=2)])
def test_fused_step_matches_the_reference(kw, dtype, monkeypatch):
    from arrayopt.backends.numba_cpu import shampoo as kernels

    want_p, want_s = _run(kw, dtype, "reference")
    calls = []
    run = kernels.run
    monkeypatch.setattr(kernels, "run", lambda *a: calls.append(len(a[2])) or run(*a))
    got_p, got_s = _run(kw, dtype, "numba_cpu")
    assert len(calls) >= 4 * 3  # every step, every block
    # the params through the fused tail (graft norms as float64 sums in SIMD lanes): the kernel rule,
    # normwise per leaf; the second moments bit for bit
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for k in PARAMS:
        assert np.linalg.norm(got_p[k] - want_p[k]) <= tol * np.linalg.norm(want_p[k]), k
    for a, b in zip(got_s["second_moment"], want_s["second_moment"]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b2,t", [(0.95, 1), (0.999, 7), (1.0, 3)])
def test_kernel_equals_corrected_moment(dtype, b2, t):
    from arrayopt.backends.numba_cpu import BACKEND

    rng = np.random.default_rng(int(b2 * 1000) + t)
    gh = rng.standard_normal((50, 40)).astype(dtype)
    d = rng.random((50, 40)).astype(dtype)
    d[0, :3] = 0.0  # a zero moment and zero gradient: X = 0
    gh[0, :2] = 0.0
    step = corrected_moment_step(b2, t, 1e-8)
    want_x, want_d = corrected_moment(np, gh, d, step)
    (x,) = BACKEND.run("shampoo_corrected", [gh], [], [[d]], step)
    assert x is gh
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(d, want_d)


def test_explain_names_the_kernel_and_root_inverse_takes_the_tail():
    p = {"w": np.zeros((8, 6), np.float32)}
    ec = ao.shampoo(preconditioner="eigenvalue_corrected")
    assert dispatch.choose(ec.kernel_op, resolve(p["w"]), ec.step_description(0),
                           *ec._kernel_groups([p["w"]], [p["w"]], ec.init(p))).backend.name == "numba_cpu"
    assert ao.shampoo().kernel_op == "sketchy"  # tests/shampoo/test_shampoo_tail.py


def test_a_read_only_second_moment_takes_the_reference():
    kw = dict(b2=0.95, block_size=16, eps=1e-8)
    want_p, want_s = _run(kw, np.float32, "reference", steps=2)
    opt = ao.shampoo(learning_rate=0.05, preconditioner="eigenvalue_corrected", merge_small_dims=1, **kw)
    rng = np.random.default_rng(3)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in PARAMS.items()}
    state = opt.init(params)
    for per_leaf in state["second_moment"]:
        for d in per_leaf:
            d.flags.writeable = False
    with dispatch.use_backend("numba_cpu"):
        for _ in range(2):
            grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in PARAMS.items()}
            params, state = opt.step(params, grads, state)
    for k in PARAMS:  # the tail still fused: the kernel rule
        assert np.linalg.norm(params[k] - want_p[k]) <= 1e-5 * np.linalg.norm(want_p[k]), k
    for a, b in zip(state["second_moment"], want_s["second_moment"]):
        for x, y in zip(a, b):  # the reference's moments (the read-only arrays were not written)
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- the CUDA kernel (shampoo.cu)

try:
    from . import _cuda_host_harness as hh
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import _cuda_host_harness as hh

needs_nvcc = pytest.mark.skipif(hh.nvcc() is None, reason="nvcc is not on PATH")


@pytest.fixture(scope="module")
def shampoo_harness(tmp_path_factory):
    return hh.HostHarness(hh.build_harness(hh.CU_DIR / "shampoo.cu", tmp_path_factory.mktemp("shampoo_harness")))


@needs_nvcc
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b2,t", [(0.95, 2), (1.0, 4)])
def test_host_cuda_arithmetic_equals_corrected_moment(shampoo_harness, dtype, b2, t):
    """``shampoo.cu``'s arithmetic, built for the host, equals the reference bit for bit."""
    rng = np.random.default_rng(7)
    gh = rng.standard_normal(300).astype(dtype)
    d = rng.random(300).astype(dtype)
    gh[:2], d[:3] = 0.0, 0.0
    step = corrected_moment_step(b2, t, 1e-8)
    want_x, want_d = corrected_moment(np, gh, d, step)
    shampoo_harness.launch("shampoo_corrected_moment", dtype,
                           (gh, d, np.int64(gh.size), dtype(step.decay), dtype(step.weight), dtype(step.inv_bias),
                            dtype(step.eps)))
    np.testing.assert_array_equal(gh, want_x)
    np.testing.assert_array_equal(d, want_d)


@needs_nvcc
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_emulated_device_steps_match_the_reference(shampoo_harness, tmp_path_factory, monkeypatch, dtype):
    """The CUDA drivers (``backends/cupy_cuda/shampoo.py``, and ``sketchy.py`` for the tail) on a fake
    ``cupy`` whose kernels are the host builds of their ``.cu`` files: whole steps match the reference
    (float64 1e-12, float32 1e-5 normwise: the graft norms are sums in another order)."""
    import sys

    from arrayopt.backends.cupy_cuda import first_order, sketchy

    launches = []
    fo = hh.shared_harness(first_order.KERNELS.path, tmp_path_factory)
    sk = hh.shared_harness(sketchy.KERNELS.path, tmp_path_factory)
    monkeypatch.setitem(sys.modules, "cupy", hh.fake_cupy(hh.JoinedHarness(shampoo_harness, fo, sk), launches))
    hh.fresh_loader(monkeypatch)
    backend = hh.emulated_backend()
    monkeypatch.setattr(dispatch, "backends", lambda: [backend])
    kw = dict(b2=0.95, root_method="qr", block_size=16, eps=1e-8)
    opt = ao.shampoo(learning_rate=0.05, preconditioner="eigenvalue_corrected", merge_small_dims=1, **kw)
    rng = np.random.default_rng(3)
    host = {k: rng.standard_normal(s).astype(dtype) for k, s in PARAMS.items()}
    dev = {k: hh.as_fake(v.copy()) for k, v in host.items()}
    state, ref_state = opt.init(dev), opt.init(host)
    for _ in range(3):
        g = {k: rng.standard_normal(s).astype(dtype) for k, s in PARAMS.items()}
        dev, state = opt.step(dev, {k: hh.as_fake(v.copy()) for k, v in g.items()}, state)
        with dispatch.use_backend("reference"):
            host, ref_state = opt.step(host, g, ref_state)
    assert sum("shampoo_corrected_moment" in e for e, _, _ in launches) >= 3 * 3
    assert sum("sketchy_write" in e for e, _, _ in launches) >= 3 * len(PARAMS)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for k in PARAMS:
        assert np.linalg.norm(np.asarray(dev[k]) - host[k]) <= tol * np.linalg.norm(host[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("arrayopt.backends.cupy_cuda", fromlist=["BACKEND"]).BACKEND.available(),
                    reason="needs a CUDA device and cupy")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_device_step_takes_the_kernel_and_matches_the_reference(dtype):
    import cupy

    from arrayopt.backends import cupy_cuda

    kw = dict(b2=0.95, root_method="qr", block_size=16, eps=1e-8)
    opt = ao.shampoo(learning_rate=0.05, preconditioner="eigenvalue_corrected", merge_small_dims=1, **kw)
    rng = np.random.default_rng(3)
    host = {k: rng.standard_normal(s).astype(dtype) for k, s in PARAMS.items()}
    params = {k: cupy.asarray(v) for k, v in host.items()}
    state, ref_state = opt.init(params), opt.init(host)
    for _ in range(3):
        g = {k: rng.standard_normal(s).astype(dtype) for k, s in PARAMS.items()}
        leaves = list(params.values())
        chosen = dispatch.choose(opt.kernel_op, resolve(leaves[0]), opt.step_description(state["count"]),
                                 *opt._kernel_groups(leaves, [cupy.asarray(v) for v in g.values()], state))
        assert chosen.backend is cupy_cuda.BACKEND, chosen.reason
        params, state = opt.step(params, {k: cupy.asarray(v) for k, v in g.items()}, state)
        with dispatch.use_backend("reference"):
            host, ref_state = opt.step(host, g, ref_state)
    rtol = 1e-9 if dtype == "float64" else 2e-3  # cuBLAS and host BLAS products differ by rounding
    for k in PARAMS:
        np.testing.assert_allclose(cupy.asnumpy(params[k]), host[k], rtol=rtol, atol=rtol * np.abs(host[k]).max())


def test_fused_steps_from_threads_equal_the_sequential_runs():
    """One shared eigenvalue-corrected optimizer, three threads with their own states (fused kernel)."""
    import threading

    opt = ao.shampoo(learning_rate=0.05, preconditioner="eigenvalue_corrected", root_method="qr", block_size=32,
                     b2=0.95, eps=1e-8)

    def run(seed, out, barrier=None):
        rng = np.random.default_rng(seed)
        p = {"w": rng.standard_normal((64, 40)).astype(np.float32)}
        s = opt.init(p)
        with dispatch.use_backend("numba_cpu"):
            for _ in range(5):
                if barrier is not None:
                    barrier.wait()
                p, s = opt.step(p, {"w": rng.standard_normal((64, 40)).astype(np.float32)}, s)
        out[seed] = p["w"]

    seq, par, barrier = {}, {}, threading.Barrier(3)
    for i in range(3):
        run(i, seq)
    ts = [threading.Thread(target=run, args=(i, par, barrier)) for i in range(3)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    for i in range(3):
        np.testing.assert_array_equal(par[i], seq[i])
