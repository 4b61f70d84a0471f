"""Banded SONew Numba kernels: the unrolled kernels (b = 2..8) against the generic ones, bit for bit.

The generic kernels (any ``b``) are checked against the reference in ``test_sonew.py``
(O17) and below for a band past the unrolled range. The sizes cross the sub-block
(512 rows) and chunk (16384 rows) boundaries and cover ``n <= b``; the gradients make
near-singular windows so that the bandwidth fallback fires.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import arrayopt as ao

pytest.importorskip("numba", reason="the Numba backend needs numba")

from arrayopt.backends.numba_cpu.sonew import _gen_band_kernels as gen_band_kernels  # noqa: E402
from arrayopt.backends.numba_cpu.sonew import codegen  # noqa: E402
from arrayopt.backends.numba_cpu.sonew.whole import CHUNK  # noqa: E402


@contextlib.contextmanager
def _kernels(unrolled):
    """Run the unrolled band kernels (default) or, with ``unrolled=False``, the generic ones."""
    saved = dict(gen_band_kernels.STATS), dict(gen_band_kernels.FACTOR_APPLY)
    if not unrolled:
        gen_band_kernels.STATS.clear()
        gen_band_kernels.FACTOR_APPLY.clear()
    try:
        yield
    finally:
        gen_band_kernels.STATS.update(saved[0])
        gen_band_kernels.FACTOR_APPLY.update(saved[1])


@pytest.fixture
def numba_calls(monkeypatch):
    """A list that grows by one each time the Numba backend runs a SONew step."""
    from arrayopt.backends.numba_cpu import sonew as numba_sonew

    calls = []
    real = numba_sonew.run
    monkeypatch.setattr(numba_sonew, "run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _run(b, n, dtype, graft, wd, unrolled, steps=3):
    rng = np.random.default_rng(1000 * b + n)
    p = rng.standard_normal(n).astype(dtype)
    opt = ao.sonew(1e-2, band=b, graft=graft, eps=1e-9 if dtype == "float32" else 1e-30, weight_decay=wd, block_size=None)
    st = opt.init(p)
    with _kernels(unrolled), ao.dispatch.use_backend("numba_cpu"):
        for s in range(steps):
            g = rng.standard_normal(n).astype(dtype)
            if s >= 1:  # pairs of equal entries: singular windows, rows fall back
                g[1::2] = g[0::2][: g[1::2].size]
                g[::13] *= 1e-3
            p, st = opt.step(p, g, st)
    return p, st


def _ints(x):
    return [int(v) for v in x]


# every unrolled band in float32; float64 (a second compilation of each kernel) for two of them.
# Bands 2..4 are compiled for the optimizer records anyway; 5..8 only here (each unrolled kernel
# takes tens of seconds to compile), so those are marked slow (-m "not slow" leaves them out).
CASES = [(b, "float32") if b <= 4 else pytest.param(b, "float32", marks=pytest.mark.slow)
         for b in codegen.BANDS] + [(2, "float64"), pytest.param(5, "float64", marks=pytest.mark.slow)]


@pytest.mark.parametrize("b,dtype", CASES)
def test_unrolled_equals_generic_bit_for_bit(b, dtype):
    fallbacks = 0
    for n in (3, b + 2, 1000, 2 * CHUNK + 7):
        for graft, wd in (("none", 0.0), ("adam", 0.01), ("sgd", 0.0), ("momentum", 0.0)):
            pu, su = _run(b, n, dtype, graft, wd, unrolled=True)
            pg, sg = _run(b, n, dtype, graft, wd, unrolled=False)
            for key in ("mu", "band"):
                np.testing.assert_array_equal(su[key][0], sg[key][0], err_msg=f"{key} n={n}")
            assert _ints(su["removed_edges"]) == _ints(sg["removed_edges"])
            assert _ints(su["fallback_rows"]) == _ints(sg["fallback_rows"])
            fallbacks += _ints(su["fallback_rows"])[0]
            if graft == "none":
                np.testing.assert_array_equal(pu, pg)
            else:
                # the graft's float64 norm is summed in another order: the scale may differ in the last bit
                rtol = 1e-13 if dtype == "float64" else 1e-6
                np.testing.assert_allclose(pu, pg, rtol=rtol, atol=rtol * np.max(np.abs(pg)))
    assert fallbacks > 0, "the fallback path was not exercised"


def test_generic_band_kernel_past_the_unrolled_range_matches_reference():
    b = codegen.BANDS[-1] + 1
    assert b not in gen_band_kernels.STATS
    rng = np.random.default_rng(7)
    n = CHUNK + 123
    opt = ao.sonew(0.01, band=b, eps=1e-2, block_size=None)
    p0 = rng.normal(size=n)
    grads = [rng.normal(size=n) for _ in range(3)]
    out = []
    for backend in ("numba_cpu", "reference"):
        p = p0.copy()
        st = opt.init(p)
        with ao.dispatch.use_backend(backend):
            for g in grads:
                p, st = opt.step(p, g, st)
        out.append((p, st))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out[0][1]["band"][0], out[1][1]["band"][0], rtol=1e-12, atol=1e-30)


@pytest.mark.parametrize("b", [1, 2, 4, codegen.BANDS[-1] + 1])
def test_block_cuts_match_reference(b, numba_calls):
    """``block_size``: the Numba kernels cut the band at block ends as the reference's mask does."""
    rng = np.random.default_rng(11)
    n = 2 * CHUNK + 7
    p0 = rng.normal(size=n)
    grads = [rng.normal(size=n) for _ in range(3)]
    for block_size in (1, 7, 512, 1000):
        opt = ao.sonew(0.01, band=b, eps=1e-3, block_size=block_size)
        out = []
        for backend in ("numba_cpu", "reference"):
            p = p0.copy()
            st = opt.init(p)
            with ao.dispatch.use_backend(backend):
                for g in grads:
                    p, st = opt.step(p, g, st)
            out.append((p, st))
        band = out[0][1]["band"][0]
        np.testing.assert_allclose(band, out[1][1]["band"][0], rtol=1e-12, atol=1e-30)
        np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-10, atol=1e-12)
        j = np.arange(n)[:, None]
        crossing = (j // block_size) != ((j + np.arange(b + 1)[None, :]) // block_size)
        assert np.all(band[crossing] == 0)
    assert len(numba_calls) == 4 * 3, "the Numba kernels were not used"


def test_block_cuts_unrolled_equal_generic():
    rng = np.random.default_rng(5)
    n = CHUNK + 300
    g = rng.normal(size=n).astype("float32")
    res = []
    for unrolled in (True, False):
        with _kernels(unrolled):
            opt = ao.sonew(0.01, band=3, graft="none", block_size=100)
            p = np.ones(n, dtype="float32")
            st = opt.init(p)
            for s in range(2):
                p, st = opt.step(p, g * (s + 1), st)
        res.append((p, st["band"][0]))
    np.testing.assert_array_equal(res[0][0], res[1][0])
    np.testing.assert_array_equal(res[0][1], res[1][1])


@pytest.mark.parametrize("b", [0, 1, 4])
def test_f_order_flattening_matches_reference(b, numba_calls):
    """``flatten_order="F"`` runs the kernels on first-axis-fastest copies and writes p, m back."""
    rng = np.random.default_rng(12)
    shapes = {"w": (130, 70), "k": (3, 5, 40), "bias": (70,)}
    p0 = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(3)]
    opt = ao.sonew(0.01, band=b, eps=1e-3, flatten_order="F", block_size=64)
    out = []
    for backend in ("numba_cpu", "reference"):
        p = {k: v.copy() for k, v in p0.items()}
        st = opt.init(p)
        with ao.dispatch.use_backend(backend):
            for g in grads:
                p, st = opt.step(p, g, st)
        out.append((p, st))
    for k in shapes:
        np.testing.assert_allclose(out[0][0][k], out[1][0][k], rtol=1e-10, atol=1e-12, err_msg=k)
    for a, r in zip(out[0][1]["mu"], out[1][1]["mu"]):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-30)
    for a, r in zip(out[0][1]["band"], out[1][1]["band"]):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-30)
    assert len(numba_calls) == 3


@pytest.mark.parametrize("band", [7, 12])
def test_wide_band_float32_step_equals_reference_bit_for_bit(band):
    """Relative ε from the max row sum: the reference sums each row in the kernels' order, so a
    band of 7 or more (NumPy's pairwise row sum starts at eight entries) matches bit for bit."""
    from arrayopt import dispatch

    opt = ao.sonew(0.01, band=band, graft="none", weight_decay=0.01, block_size=None)
    rng, r0 = np.random.default_rng(1), np.random.default_rng(0)
    p = {k: r0.normal(size=s).astype(np.float32) for k, s in zip("abc", [(17, 33), (5,), (70000,)])}
    q = {k: v.copy() for k, v in p.items()}
    sp, sq = opt.init(p), opt.init(q)
    for _ in range(3):
        g = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in p.items()}
        p, sp = opt.step(p, g, sp)
        with dispatch.use_backend("reference"):
            q, sq = opt.step(q, g, sq)
    for k in p:
        np.testing.assert_array_equal(p[k], q[k])
