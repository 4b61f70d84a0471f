"""``backends/cupy_cuda/eva.cu`` without a GPU: it compiles for sm_90 (``test_cupy_cuda.py``
compiles every ``.cu``) and its arithmetic, built for the host, gives the reference's Eva step.

The kernels are not wired into the CuPy backend yet: CuPy arrays take the reference path
(``ao.explain`` says so); these tests check the arithmetic the wiring will launch.
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao
from arrayopt.linalg import kl_scale

try:
    from . import _cuda_host_harness as hh
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import _cuda_host_harness as hh

EVA_CU = hh.CU_DIR / "eva.cu"
pytestmark = pytest.mark.skipif(hh.nvcc() is None, reason="nvcc is not on PATH")


@pytest.fixture(scope="module")
def eva_harness(tmp_path_factory):
    return hh.HostHarness(hh.build_harness(EVA_CU, tmp_path_factory.mktemp("eva_harness")))


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
