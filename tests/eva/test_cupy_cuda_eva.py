"""Eva on the CUDA backend (``backends/cupy_cuda/eva.cu``, driver ``eva.py``), with and without a GPU.

Without one: the ``.cu`` compiles for sm_90 (``test_cupy_cuda.py`` compiles every ``.cu``);
its arithmetic, built for the host, gives the reference's Eva step; and whole ``ao.eva`` steps
run through ``CupyCUDA.run("eva", ...)`` on a fake ``cupy`` whose kernels are the host
harness, against the reference path. With a CUDA device and CuPy: ``ao.eva(...).step`` on CuPy
arrays and torch CUDA tensors takes the kernels and matches the NumPy reference (marked
``gpu``; skipped here: "needs a CUDA device and cupy").
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao
from arrayopt import dispatch
from arrayopt._xp import resolve
from arrayopt.backends import cupy_cuda
from arrayopt.backends.cupy_cuda import eva, first_order
from arrayopt.linalg import kl_scale

try:
    from . import _cuda_host_harness as hh
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import _cuda_host_harness as hh

EVA_CU = eva.KERNELS.path
needs_nvcc = pytest.mark.skipif(hh.nvcc() is None, reason="nvcc is not on PATH")
needs_cuda = pytest.mark.skipif(not cupy_cuda.BACKEND.available(), reason="needs a CUDA device and cupy")


@pytest.fixture(scope="module")
def eva_harness(tmp_path_factory):
    return hh.HostHarness(hh.build_harness(EVA_CU, tmp_path_factory.mktemp("eva_harness")))


@needs_nvcc
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("variant,nesterov,momentum",
                         [("eva", False, 0.9), ("eva_f", True, 0.9), ("eva", False, 0.0)])
def test_host_kernels_give_the_reference_step(eva_harness, dtype, rtol, variant, nesterov, momentum):
    rng = np.random.default_rng(5)
    d_out, d_in = 6, 9
    p0 = rng.normal(size=(d_out, d_in)).astype(dtype)
    G = rng.normal(size=(d_out, d_in)).astype(dtype)
    a, g = rng.normal(size=d_in).astype(dtype), rng.normal(size=d_out).astype(dtype)
    lr, damping, wd = 0.5, 0.03, 1e-3
    opt = ao.eva(lr, momentum=momentum, damping=damping, weight_decay=wd, variant=variant, nesterov=nesterov)
    with ao.dispatch.use_backend("reference"):
        want, _ = opt.step({"w": p0.copy()}, {"w": G}, opt.init({"w": p0}), stats={"w": (a, g)})
    # the host build of the kernels, glued as the Numba driver glues its own
    rowdot, rowsq = np.empty(d_out, dtype), np.empty(d_out, dtype)
    eva_harness.launch("eva_row_reduce", dtype, (G, a, np.int64(d_out), np.int64(d_in), rowdot, rowsq))
    np.testing.assert_allclose(rowdot, G @ a, rtol=rtol * 10)
    np.testing.assert_allclose(rowsq, np.sum(G * G, axis=1), rtol=rtol)
    gamma = dtype(damping)
    gsq = np.sum(rowsq)
    if variant == "eva":
        gGa = np.sum(g * rowdot)
        beta = gGa / (gamma + np.sum(a * a) * np.sum(g * g))
        coef, inner = (beta * g).astype(dtype), (gsq - beta * gGa) / gamma
    else:
        c = dtype(1) / (gamma + np.sum(a * a))
        coef, inner = (c * rowdot).astype(dtype), (gsq - c * np.sum(rowdot * rowdot)) / gamma
    nu = dtype(kl_scale([np.asarray(inner)], lr, 1e-3, "clip"))
    p, buf = p0.copy(), np.zeros_like(p0)
    eva_harness.launch("eva_apply", dtype, (p, G, buf, a, coef, np.int64(d_out), np.int64(d_in), nu / gamma,
                                            dtype(lr), dtype(momentum), dtype(wd), int(nesterov), int(momentum > 0)))
    np.testing.assert_allclose(p, want["w"], rtol=rtol, atol=rtol * 1e-2)
    if momentum > 0:  # the buffer started at 0: it holds d, computed in the same IEEE operations
        d = (G - coef[:, None] * a[None, :]) * (nu / gamma) + dtype(wd) * p0
        np.testing.assert_array_equal(buf, d)


# ---------------------------------------------------------------- full steps on a fake device


@pytest.fixture(scope="module")
def fo_harness(tmp_path_factory):
    return hh.shared_harness(first_order.KERNELS.path, tmp_path_factory)


@pytest.fixture
def emulated(eva_harness, fo_harness, monkeypatch):
    import sys

    fo = fo_harness
    launches = []
    monkeypatch.setitem(sys.modules, "cupy", hh.fake_cupy(hh.JoinedHarness(eva_harness, fo), launches))
    hh.fresh_loader(monkeypatch)
    backend = hh.emulated_backend()
    monkeypatch.setattr(dispatch, "backends", lambda: [backend])
    return launches


@needs_nvcc
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("kw", [{}, {"variant": "eva_f", "kl_mode": "rescale", "momentum": 0.0},
                                {"nesterov": True, "weight_decay": 1e-3, "kl_mode": "normalize"}],
                         ids=["eva", "eva_f-rescale-nomomentum", "nesterov-normalize"])
def test_emulated_device_steps_match_the_reference(emulated, dtype, rtol, kw):
    rng = np.random.default_rng(2)
    shapes = {"w": (6, 9), "b": (6,), "k": (3, 2, 4), "n": (5,)}
    host = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    opt = ao.eva(0.1, damping=0.1, kl_clip=1e-2, **kw)
    dev = {k: hh.as_fake(v.copy()) for k, v in host.items()}
    state, ref_state, ref = opt.init(dev), opt.init(host), {k: v.copy() for k, v in host.items()}
    for _ in range(3):
        g = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
        stats = {"w": {"a": rng.normal(size=10).astype(dtype), "g": rng.normal(size=6).astype(dtype), "bias": "b"},
                 "k": (rng.normal(size=8).astype(dtype), rng.normal(size=3).astype(dtype))}
        out, state = opt.step(dev, {k: hh.as_fake(v.copy()) for k, v in g.items()}, state, stats=stats)
        assert all(out[k] is dev[k] for k in dev)  # in place, on the device
        with dispatch.use_backend("reference"):
            ref, ref_state = opt.step(ref, g, ref_state, stats=stats)
    kernels = {e.split("<")[0] for e, _, _ in emulated}
    assert {"arrayopt::eva_row_reduce", "arrayopt::eva_apply"} <= kernels
    # the range check (‖g‖² of every gradient) also finds NaN/Inf: no separate finiteness pre-pass
    assert "arrayopt::count_nonfinite" not in kernels
    for k in shapes:
        np.testing.assert_allclose(np.asarray(dev[k]), ref[k], rtol=rtol, atol=rtol * 1e-2, err_msg=k)
    for name in ("kv_a", "kv_g") if opt.variant == "eva" else ("kv_a",):
        for a, b in zip(state[name], ref_state[name]):
            if b is not None:
                np.testing.assert_array_equal(a, b)


@needs_nvcc
def test_emulated_device_rejects_a_nonfinite_gradient_with_nothing_written(emulated):
    rng = np.random.default_rng(3)
    host = {"w": rng.normal(size=(4, 5)), "b": rng.normal(size=4)}
    opt = ao.eva(0.1)
    dev = {k: hh.as_fake(v.copy()) for k, v in host.items()}
    state = opt.init(dev)
    g = {k: hh.as_fake(rng.normal(size=v.shape)) for k, v in host.items()}
    g["w"][1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step(dev, g, state, stats={"w": {"a": np.ones(6), "g": np.ones(4), "bias": "b"}})
    for k in host:
        np.testing.assert_array_equal(np.asarray(dev[k]), host[k])


# ---------------------------------------------------------------- on a CUDA device


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lib", ["cupy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", ["eva", "eva_f"])
def test_device_eva_step_takes_the_kernels_and_matches_reference(lib, dtype, variant):
    import cupy

    if lib == "torch":
        torch = pytest.importorskip("torch", reason="torch CUDA tensors need torch")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device and cupy (torch sees no CUDA device)")
        to_dev = lambda a: torch.as_tensor(a, device="cuda")  # noqa: E731
        to_host = lambda a: a.cpu().numpy()  # noqa: E731
    else:
        to_dev, to_host = cupy.asarray, cupy.asnumpy
    rng = np.random.default_rng(5)
    shapes = {"w": (33, 17), "b": (33,), "conv": (8, 3, 3, 3), "n": (70_000,)}
    host = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    opt = ao.eva(0.1, variant=variant, weight_decay=1e-3, nesterov=True)
    params = {k: to_dev(v) for k, v in host.items()}
    state, ref_state, ref = opt.init(params), opt.init(host), {k: v.copy() for k, v in host.items()}
    for _ in range(3):
        g = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
        st = {"w": {"a": rng.normal(size=18).astype(dtype), "g": rng.normal(size=33).astype(dtype),
                    "bias": "b"},
              "conv": (rng.normal(size=27).astype(dtype), rng.normal(size=8).astype(dtype))}
        st_dev = {"w": {"a": to_dev(st["w"]["a"]), "g": to_dev(st["w"]["g"]), "bias": "b"},
                  "conv": tuple(to_dev(v) for v in st["conv"])}
        leaves, g_leaves = list(params.values()), [to_dev(v) for v in g.values()]
        chosen = dispatch.choose("eva", resolve(leaves[0]), opt.step_description(state["count"]),
                                 leaves, g_leaves, state["momentum_buffer"])
        assert chosen.backend is cupy_cuda.BACKEND, chosen.reason
        out, state = opt.step(params, {k: to_dev(v) for k, v in g.items()}, state, stats=st_dev)
        assert all(out[k] is params[k] for k in params)
        with dispatch.use_backend("reference"):
            ref, ref_state = opt.step(ref, g, ref_state, stats=st)
    rtol = 1e-10 if dtype == "float64" else 1e-4
    for k in shapes:
        np.testing.assert_allclose(to_host(params[k]), ref[k], rtol=rtol, atol=rtol * np.abs(ref[k]).max(),
                                   err_msg=k)
