"""Block-local SONew (``block_size``): the reference against its oracles, the Numba block driver against it.

Oracles: block-local with ``B >= n`` is the whole-tensor step (bit for bit); block-local
on one vector equals the whole-tensor step on its blocks given as separate tensors
(O10 separability, now for ε and the graft norms too); a block's update does not see
the scale of the other blocks. The Numba one-pass driver is checked against the
reference (float64 1e-12, float32 1e-6: the fused diag/tridiagonal blocks multiply by ``1/bc1``,
``1/bc2`` and sum norms in SIMD lanes) over bands, grafts and the Adam fallback.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arrayopt as ao
from arrayopt import dispatch, grafting

GRAFTS = ["adam", "none", "sgd", "momentum", "rmsprop_normalized"]


def _run(opt, p0, grads, backend):
    p = {k: v.copy() for k, v in p0.items()} if isinstance(p0, dict) else [v.copy() for v in p0]
    st_ = opt.init(p)
    with dispatch.use_backend(backend):
        for g in grads:
            p, st_ = opt.step(p, g, st_)
    return p, st_


@given(st.integers(1, 40), st.integers(1, 9), st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_block_norms_are_the_norms_of_the_blocks(n, size, seed):
    x = np.random.default_rng(seed).normal(size=n) * 1e20
    want = [np.linalg.norm(x[i:i + size]) for i in range(0, n, size)]
    np.testing.assert_allclose(grafting.block_norms(np, x, size), want, rtol=1e-14)


@pytest.mark.parametrize("graft", GRAFTS)
def test_block_at_least_n_is_the_whole_tensor_step(graft):
    rng = np.random.default_rng(3)
    p0 = {"w": rng.normal(size=(9, 7))}
    grads = [{"w": rng.normal(size=(9, 7))} for _ in range(3)]
    for b in (0, 1, 3):
        whole = _run(ao.sonew(0.01, band=b, graft=graft, eps=1e-4), p0, grads, "reference")
        for bs in (63, 64, 10**6):
            blk = _run(ao.sonew(0.01, band=b, graft=graft, eps=1e-4, block_size=bs), p0, grads, "reference")
            np.testing.assert_array_equal(blk[0]["w"], whole[0]["w"])
            np.testing.assert_array_equal(blk[1]["band"][0], whole[1]["band"][0])


@given(st.integers(2, 60), st.integers(1, 16), st.integers(0, 5), st.sampled_from(GRAFTS),
       st.booleans(), st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_blocks_are_independent_tensors(n, bs, b, graft, relative, seed):
    """O10 for the whole step: blocks of one vector = separate tensors (ε, graft norms, band cuts)."""
    rng = np.random.default_rng(seed)
    kw = dict(band=b, graft=graft, eps=1e-3, relative_eps=relative, weight_decay=0.01)
    p0 = rng.normal(size=n)
    grads = [rng.normal(size=n) * rng.uniform(0.1, 10.0) for _ in range(3)]
    cut = list(range(bs, n, bs))
    blk = _run(ao.sonew(0.05, block_size=bs, **kw), [p0], [[g] for g in grads], "reference")
    sep = _run(ao.sonew(0.05, **kw), np.split(p0, cut), [np.split(g, cut) for g in grads], "reference")
    np.testing.assert_allclose(blk[0][0], np.concatenate(sep[0]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(blk[1]["mu"][0], np.concatenate(sep[1]["mu"]), rtol=1e-14, atol=1e-16)
    assert int(blk[1]["removed_edges"][0]) == sum(int(r) for r in sep[1]["removed_edges"])
    assert int(blk[1]["fallback_rows"][0]) == sum(int(r) for r in sep[1]["fallback_rows"])


def test_crossing_band_entries_stay_zero_and_no_block_sees_another():
    rng = np.random.default_rng(4)
    n, bs = 50, 16
    g = rng.normal(size=n)
    g2 = g.copy()
    g2[bs:] *= 1e6  # every other block's scale
    opt = ao.sonew(0.1, band=2, block_size=bs)
    outs = [_run(opt, {"w": np.zeros(n)}, [{"w": x}], "reference") for x in (g, g2)]
    np.testing.assert_array_equal(outs[0][0]["w"][:bs], outs[1][0]["w"][:bs])
    band = outs[0][1]["band"][0]
    j = np.arange(n)[:, None]
    assert np.all(band[(j // bs) != ((j + np.arange(3)[None, :]) // bs)] == 0)


try:
    import numba  # noqa: F401
    HAVE_NUMBA = True
except ImportError:
    HAVE_NUMBA = False
numba_only = pytest.mark.skipif(not HAVE_NUMBA, reason="the Numba backend needs numba")


@pytest.fixture
def numba_calls(monkeypatch):
    """A list that grows by one each time the Numba backend runs a SONew step."""
    from arrayopt.backends.numba_cpu import sonew as numba_sonew

    calls = []
    real = numba_sonew.run
    monkeypatch.setattr(numba_sonew, "run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@numba_only
# bands and dtypes whose block-driver compilations other tests share (each costs seconds of LLVM)
# (tridiagonal in float32: its near-singular first steps are where a changed rounding would show)
@pytest.mark.parametrize("b, dtype", [(0, "float64"), (1, "float32"), (2, "float64"), (9, "float64"),
                                      (4, "float32")])
def test_numba_block_driver_matches_reference(b, dtype, numba_calls):
    rng = np.random.default_rng(b)
    shapes = {"w": (37, 29), "k": (3, 5, 40), "bias": (70,)}
    p0 = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()} for _ in range(3)]
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == "float64" else dict(rtol=1e-6, atol=1e-6)
    calls = 0
    for graft in GRAFTS:
        for bs, order, fb in ((64, "fan_in", "sonew"), (7, "F", "adam"), (None, "fan_in", "adam")):
            if bs is None and graft in ("adam", "none"):
                continue  # whole-tensor chunk kernels: covered in test_sonew_band_kernels.py
            opt = ao.sonew(0.02, band=b, graft=graft, eps=1e-3, weight_decay=0.01, block_size=bs,
                           flatten_order=order, small_param_fallback=fb)
            got, want = (_run(opt, p0, grads, be) for be in ("numba_cpu", "reference"))
            calls += len(grads)
            for k in shapes:
                scale = np.abs(want[0][k]).max()
                np.testing.assert_allclose(got[0][k] / scale, want[0][k] / scale, err_msg=f"{graft} {bs} {k}",
                                           **tol)
            for name in ("mu", "band") + (("graft_nu",) if graft == "rmsprop_normalized" else ()):
                for a, r in zip(got[1][name], want[1][name]):
                    np.testing.assert_allclose(a, r, err_msg=name, **tol)
            for name in ("removed_edges", "fallback_rows"):
                assert [int(x) for x in got[1][name]] == [int(x) for x in want[1][name]], name
    assert len(numba_calls) == calls, "the Numba kernels were not used"


@numba_only
@pytest.mark.parametrize("b", [4])
def test_numba_one_block_of_n_equals_whole_tensor_kernels_bit_for_bit(b):
    """Same arithmetic in the same order: the block driver with ``B = n`` and the chunked kernels."""
    rng = np.random.default_rng(7)
    p0 = {"w": rng.normal(size=(40, 50)).astype(np.float32)}
    grads = [{"w": rng.normal(size=(40, 50)).astype(np.float32)} for _ in range(3)]
    whole = _run(ao.sonew(0.02, band=b, weight_decay=0.01), p0, grads, "numba_cpu")
    blk = _run(ao.sonew(0.02, band=b, weight_decay=0.01, block_size=2000), p0, grads, "numba_cpu")
    np.testing.assert_array_equal(blk[0]["w"], whole[0]["w"])
    np.testing.assert_array_equal(blk[1]["band"][0], whole[1]["band"][0])


@numba_only
@given(st.sampled_from(["float32", "float64"]), st.integers(1, 70), st.integers(0, 2**16),
       st.sampled_from([0.0, 1e-30, 1.0]))
@settings(max_examples=40, deadline=None)
def test_max_row_sum_is_the_exact_max_over_every_float_class(dtype, k, seed, start):
    """``max_nonneg`` (integer max of the bit patterns, then the pattern decoded) is ``max`` exactly,
    over zeros, subnormals, normals of every exponent, the largest float and +inf."""
    from arrayopt.backends.numba_cpu._common import max_nonneg, nonneg_from_bits

    dt = np.dtype(dtype)
    fi = np.finfo(dt)
    rng = np.random.default_rng(seed)
    special = np.array([0.0, fi.smallest_subnormal, 3 * fi.smallest_subnormal, fi.tiny, fi.max, np.inf], dt)
    normal = (rng.random(k) * 2.0 ** rng.integers(fi.minexp, fi.maxexp, k).astype(float)).astype(dt)
    x = np.where(rng.random(k) < 0.2, special[rng.integers(0, special.size, k)], normal).astype(dt)
    assert max_nonneg(x, k, dt.type(start)) == max(dt.type(start), x.max())
    ints = x.view(np.int32 if dt.itemsize == 4 else np.int64).astype(np.int64)
    consts = (23, 255, 127) if dt.itemsize == 4 else (52, 2047, 1023)
    assert [nonneg_from_bits(i, *consts) for i in ints] == [float(v) for v in x]
