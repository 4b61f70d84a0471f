"""``arrayopt.grafting`` against float64 NumPy oracles, and the kernels' graft path against it."""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import arrayopt as ao
from arrayopt import grafting

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
RTOL = {"float32": 2e-6, "float64": 1e-13}


@st.composite
def wide_arrays(draw, min_size=0, max_size=64, dtype=None):
    """Arrays whose magnitudes span float32's exponent range (squares under- and overflow)."""
    dtype = dtype or draw(st.sampled_from(["float32", "float64"]))
    n = draw(st.integers(min_size, max_size))
    mant = np.array(draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)), np.float64)
    exp = draw(st.integers(-35, 35))
    zeros = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    x = mant * 10.0 ** exp
    x[np.array(zeros, bool)] = 0.0
    return x.astype(dtype)


# ---------------------------------------------------------------- oracles (float64, written plainly)


def oracle_norm(x):
    """``‖x‖₂`` in float64 by ``math.hypot`` (exact scaling: no overflow or underflow)."""
    return math.hypot(*np.asarray(x, np.float64).ravel().tolist())


def oracle_direction(kind, g, acc, t, b2, eps):
    g = np.asarray(g, np.float64)
    acc = None if acc is None else np.asarray(acc, np.float64)
    if kind == "sgd":
        return g, acc
    if kind == "sqrt_n":
        return np.sign(g), acc
    if kind == "rmsprop_normalized":
        n = oracle_norm(g)
        g = g / n if n > 0 else g
    if kind == "adagrad":
        acc = acc + g * g
        return g / (np.sqrt(acc) + eps), acc
    acc = b2 * acc + (1 - b2) * g * g
    if kind == "adam":
        return g / (np.sqrt(acc / (1 - b2 ** t)) + eps), acc
    return g / (np.sqrt(acc) + eps), acc


# ---------------------------------------------------------------- norm


@given(wide_arrays())
def test_norm_matches_float64_oracle_and_never_overflows(x):
    got = grafting.norm(np, x)
    assert got.dtype == x.dtype and np.isfinite(got)
    np.testing.assert_allclose(float(got), oracle_norm(x), rtol=RTOL[x.dtype.name], atol=0)


def test_norm_is_safe_where_squaring_is_not():
    big = np.full(4, 1e30, np.float32)
    tiny = np.full(4, 1e-30, np.float32)
    with np.errstate(over="ignore", under="ignore"):
        assert np.isinf(np.sqrt(np.sum(big * big))) and np.sqrt(np.sum(tiny * tiny)) == 0  # naive
    np.testing.assert_allclose(grafting.norm(np, big), 2e30, rtol=1e-6)
    np.testing.assert_allclose(grafting.norm(np, tiny), 2e-30, rtol=1e-6)
    assert float(grafting.norm(np, np.zeros(3, np.float32))) == 0.0
    assert float(grafting.norm(np, np.zeros(0, np.float32))) == 0.0


@given(st.lists(wide_arrays(min_size=1, max_size=20, dtype="float64"), min_size=1, max_size=4))
def test_norm_of_blocks_is_the_norm_of_the_concatenation(blocks):
    got = grafting.norm_of_blocks(np, blocks)
    np.testing.assert_allclose(float(got), oracle_norm(np.concatenate(blocks)), rtol=1e-13)


# ---------------------------------------------------------------- zero guard, scale, granularity


def test_zero_guard_gives_zero_never_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero or invalid-value warning either
        for dtype in (np.float32, np.float64):
            d = np.zeros(5, dtype)
            a = np.arange(5, dtype=dtype)
            u = grafting.graft(np, d, a)
            assert u.dtype == dtype and not np.any(u)
            assert float(grafting.graft_scale(np, dtype(3.0), dtype(0.0))) == 0.0
            assert not np.any(grafting.graft(np, a, np.zeros(5, dtype)))  # ‖a‖ = 0: zero step


@given(wide_arrays(min_size=1), st.floats(1e-3, 1e3))
def test_grafted_step_has_the_graft_norm(d, c):
    a = (d[::-1] * c).astype(d.dtype)
    u = grafting.graft(np, d, a)
    if oracle_norm(d) > 0:
        np.testing.assert_allclose(oracle_norm(u), oracle_norm(a), rtol=10 * RTOL[d.dtype.name])
        # a subnormal entry keeps only its absolute precision: one rounding of it is up to half
        # the smallest subnormal (1.4e-45 in float32), whatever its relative size
        np.testing.assert_allclose(u, d * (oracle_norm(a) / oracle_norm(d)), rtol=10 * RTOL[d.dtype.name],
                                   atol=2 * float(np.finfo(d.dtype).smallest_subnormal))
    else:
        assert not np.any(u)


@given(st.lists(st.integers(1, 12), min_size=1, max_size=4), st.integers(0, 2 ** 32 - 1),
       st.sampled_from(["float32", "float64"]))
def test_graft_blocks_per_layer_and_per_block(sizes, seed, dtype):
    rng = np.random.default_rng(seed)
    d = [(rng.standard_normal(k) * 10.0 ** rng.integers(-3, 4)).astype(dtype) for k in sizes]
    a = [(rng.standard_normal(k) * 10.0 ** rng.integers(-3, 4)).astype(dtype) for k in sizes]
    rtol = 10 * RTOL[dtype]
    layer = grafting.graft_blocks(np, d, a, per="layer")
    scale = oracle_norm(np.concatenate(a)) / oracle_norm(np.concatenate(d))
    for u, di in zip(layer, d):
        np.testing.assert_allclose(u, np.float64(di) * scale, rtol=rtol)
    np.testing.assert_allclose(np.concatenate(layer), grafting.graft(np, np.concatenate(d), np.concatenate(a)),
                               rtol=rtol)
    for u, di, ai in zip(grafting.graft_blocks(np, d, a, per="block"), d, a):
        np.testing.assert_allclose(u, np.float64(di) * (oracle_norm(ai) / oracle_norm(di)), rtol=rtol)


def test_bad_arguments_get_named_errors():
    with pytest.raises(ValueError, match="graft_per: must be one of"):
        grafting.graft_blocks(np, [np.ones(2)], [np.ones(2)], per="tensor")
    with pytest.raises(ValueError, match="a_blocks: expected 1 blocks"):
        grafting.graft_blocks(np, [np.ones(2)], [], per="layer")
    with pytest.raises(ValueError, match="graft: must be one of"):
        grafting.direction(np, "lamb", np.ones(2), None, 1)
    with pytest.raises(ValueError, match="acc: graft 'adam' needs its accumulator"):
        grafting.direction(np, "adam", np.ones(2), None, 1)
    with pytest.raises(ValueError, match="graft_per: must be one of"):
        ao.shampoo(graft_per="tensor")


# ---------------------------------------------------------------- directions


@given(st.sampled_from(grafting.DIRECTIONS), st.integers(1, 4), st.floats(0.0, 0.999),
       st.sampled_from([0.0, 1e-8, 1e-3]), st.sampled_from(["float32", "float64"]), st.integers(0, 2 ** 32 - 1))
def test_directions_match_float64_oracle(kind, steps, b2, eps, dtype, seed):
    rng = np.random.default_rng(seed)
    acc = np.zeros(9, dtype) if grafting.has_accumulator(kind) else None
    ref_acc = None if acc is None else np.zeros(9)
    for t in range(1, steps + 1):
        g = (rng.standard_normal(9) * 10.0 ** rng.integers(-2, 3)).astype(dtype)
        a, acc = grafting.direction(np, kind, g, acc, t, b2=b2, eps=eps)
        ra, ref_acc = oracle_direction(kind, g, ref_acc, t, b2, eps)
        assert a.dtype == np.dtype(dtype)
        np.testing.assert_allclose(a, ra, rtol=50 * RTOL[dtype], atol=0)
        if acc is not None:
            np.testing.assert_allclose(acc, ref_acc, rtol=50 * RTOL[dtype], atol=0)


# ---------------------------------------------------------------- optimizers and kernels use it


@pytest.mark.parametrize("per", ["layer", "block"])
def test_shampoo_step_norm_is_the_graft_norm(per):
    """Shampoo (b1 = 0, lr 1): each layer's (or block's) step has its graft direction's norm."""
    def run(per):
        rng = np.random.default_rng(0)
        p = {"w": rng.standard_normal((6, 10)).astype(np.float64)}
        opt = ao.shampoo(1.0, block_size=4, b1=0.0, graft="adagrad", graft_per=per, weight_decay=0.0)
        st_ = opt.init(p)
        for _ in range(3):
            g = {"w": rng.standard_normal((6, 10))}
            upd, st_ = opt.update(g, st_, p)
        a, _ = grafting.direction(np, "adagrad", g["w"], st_["graft"][0] - g["w"] ** 2, 3, eps=1e-8)
        return -upd["w"], a

    u, a = run(per)
    np.testing.assert_allclose(oracle_norm(u), oracle_norm(a), rtol=1e-12)
    if per == "block":
        for r in range(0, 6, 4):
            for c in range(0, 10, 4):
                np.testing.assert_allclose(oracle_norm(u[r:r + 4, c:c + 4]), oracle_norm(a[r:r + 4, c:c + 4]),
                                           rtol=1e-12)
        assert not np.allclose(u, run("layer")[0])  # a different step from per-layer grafting


def _numba_step(graft, g, band, dtype):
    """One Numba SONew step (whole tensor: the chunked kernels) from p = 0 with lr = 1: returns (p, state)."""
    opt = ao.sonew(1.0, band=band, graft=graft, block_size=None)
    p = np.zeros(g.shape, dtype)
    st_ = opt.init(p)
    with ao.dispatch.use_backend("numba_cpu"):
        p, st_ = opt.step(p, g, st_)
    return p, st_, opt


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("band", [0, 1, 3, 10])
@pytest.mark.parametrize("graft,scale", [("adam", 1.0), ("sgd", 1.0), ("momentum", 1.0), ("sgd", 1e18)])
def test_numba_sonew_graft_path_matches_the_grafting_module(graft, scale, band, dtype):
    """With p = 0 and lr = 1, graft "none" writes p = -u exactly; the grafted kernel step must be
    ``-u·graft_scale(‖a‖, ‖u‖)`` with ``a`` from the module (at scale 1e18, Σa² overflows float32)."""
    rng = np.random.default_rng(band)
    g = (rng.standard_normal(3000) * scale).astype(dtype)
    p_none, _, _ = _numba_step("none", g, band, dtype)
    p_graft, st_, opt = _numba_step(graft, g, band, dtype)
    u = -p_none
    step = opt.step_description(0)
    mhat = st_["mu"][0] / np.asarray(step.bc1, dtype)
    vhat = st_["band"][0][:, 0] / np.asarray(step.bc2, dtype)
    a = {"adam": grafting.adam_direction(np, mhat, vhat, np.asarray(step.graft_eps, dtype)),
         "sgd": g, "momentum": mhat}[graft]
    s = grafting.graft_scale(np, grafting.norm(np, a), grafting.norm(np, u))
    assert np.isfinite(s) and np.all(np.isfinite(p_graft))
    np.testing.assert_allclose(p_graft, -(u * s), rtol=4 * RTOL[dtype], atol=0)


@needs_numba
@pytest.mark.parametrize("band", [0, 1, 4])
def test_numba_and_reference_zero_guard(band):
    """A zero gradient at the first step: u = 0, the grafted step is 0 (not NaN) on both paths."""
    for backend in ("numba_cpu", "reference"):
        opt = ao.sonew(1.0, band=band, graft="sgd")
        p = np.ones(50, np.float32)
        st_ = opt.init(p)
        with ao.dispatch.use_backend(backend):
            p, st_ = opt.step(p, np.zeros(50, np.float32), st_)
        np.testing.assert_array_equal(p, np.ones(50, np.float32))
