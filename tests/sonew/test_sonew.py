"""Optimizer-level SONew oracles (O13–O18 of ``docs/sonew.md``) and float32/bfloat16 stability."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arrayopt as ao
from arrayopt.sonew.math import sonew_apply, sonew_factor
from test_sonew_linalg import band_of, dense_x


def dense_sonew(grads, lr, b, b1, b2, eps, graft):
    """Hand-written dense reference: EMA of g gᵀ, band projection, dense LogDet X, graft."""
    n = grads[0].size
    m, V = np.zeros(n), np.zeros((n, n))
    mask = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) <= b
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        V = b2 * V + (1 - b2) * np.outer(g, g)
        Hh = V / (1 - b2 ** t)
        H = np.where(mask, Hh, 0) + eps * np.eye(n)
        X = dense_x(*sonew_factor(band_of(H, b)))
        mh = m / (1 - b1 ** t)
        u = X @ mh
        if graft == "adam":
            a = mh / (np.sqrt(np.diag(Hh)) + 1e-8)
            u = u * np.linalg.norm(a) / np.linalg.norm(u)
        out.append(-lr * u)
    return out


@given(st.integers(1, 12), st.integers(0, 4), st.integers(0, 2**16), st.sampled_from(["none", "adam"]))
@settings(max_examples=20)
def test_o13_o14_steps_match_dense_reference(n, b, seed, graft):
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=n) for _ in range(4)]
    lr, b1, b2, eps = 0.1, 0.9, 0.95, 1e-2
    opt = ao.sonew(lr, band=b, b1=b1, b2=b2, eps=eps, graft=graft, relative_eps=False)
    p = np.zeros(n)
    state = opt.init(p)
    want = dense_sonew(grads, lr, b, b1, b2, eps, graft)
    V = np.zeros((n, n))
    for t, (g, w) in enumerate(zip(grads, want), start=1):
        upd, state = opt.update(g, state, p)
        np.testing.assert_allclose(upd, w, rtol=1e-10, atol=1e-12)
        V = b2 * V + (1 - b2) * np.outer(g, g)   # O13: the band of the dense EMA
        np.testing.assert_allclose(state["band"][0], band_of(V, b), rtol=1e-14, atol=1e-16)


def test_o14_one_step_is_lr_x_g():
    g = np.array([0.3, -1.2, 0.5, 2.0])
    eps = 1e-3
    opt = ao.sonew(0.5, band=1, b1=0.0, eps=eps, graft="none", relative_eps=False)
    upd, _ = opt.update(g, opt.init(np.zeros(4)), np.zeros(4))
    H = np.outer(g, g) + eps * np.eye(4)
    X = dense_x(*sonew_factor(band_of(H, 1)))
    np.testing.assert_allclose(upd, -0.5 * X @ g, rtol=1e-10)


def test_o9_relative_eps_scale_invariance():
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(5, 6)) for _ in range(3)]
    res = []
    for c in (1.0, 1e3):
        opt = ao.sonew(0.1, band=2, graft="none", eps=1e-4)
        p = np.zeros((5, 6))
        st_ = opt.init(p)
        for g in grads:
            u, st_ = opt.update(c * g, st_, p)
        res.append(u * c)  # X scales as 1/c², m̂ as c
    np.testing.assert_allclose(res[0], res[1], rtol=1e-9)


@pytest.mark.parametrize("graft", ["adam", "sgd", "momentum", "none"])
def test_o15_grafting_norm_and_direction(graft):
    rng = np.random.default_rng(1)
    p = rng.normal(size=(6, 5)).astype(np.float32)
    opt = ao.sonew(1.0, band=1, graft=graft, eps=1e-3, b1=0.0, b2=0.5)
    none = ao.sonew(1.0, band=1, graft="none", eps=1e-3, b1=0.0, b2=0.5)
    s1, s2 = opt.init(p), none.init(p)
    for _ in range(3):
        g = rng.normal(size=(6, 5)).astype(np.float32)
        u, s1 = opt.update(g, s1, p)
        x, s2 = none.update(g, s2, p)
    v = s1["band"][0][:, 0] / (1 - 0.5 ** 3)
    target = {"adam": np.linalg.norm(g.ravel() / (np.sqrt(v) + 1e-8)), "sgd": np.linalg.norm(g),
              "momentum": np.linalg.norm(g), "none": np.linalg.norm(x)}[graft]
    assert np.linalg.norm(u) == pytest.approx(target, rel=1e-6)
    cos = np.sum(u * x, dtype=np.float64) / (np.linalg.norm(u) * np.linalg.norm(x))
    assert cos >= 1 - 1e-6


def test_o16_flatten_convention_fan_in():
    """(out, in) torch layout, fan_in order: band[:, 1] couples w[o, i] and w[o, i+1] (+ the wrap pair)."""
    rng = np.random.default_rng(2)
    out_, in_ = 4, 5
    opt = ao.sonew(0.1, band=1, eps=1e-3)
    p = np.zeros((out_, in_))
    st_ = opt.init(p)
    for _ in range(5):  # gradient constant along `in`, independent across outputs, sign-flipping rows
        g = np.repeat(rng.normal(size=(out_, 1)), in_, axis=1)
        _, st_ = opt.update(g, st_, p)
    e = st_["band"][0][:, 1].reshape(out_, in_)
    assert np.all(e[:, :-1] > 0)                  # same output unit, adjacent inputs: correlated
    wrap = st_["band"][0][in_ - 1: out_ * in_ - 1: in_, 1]
    assert np.all(e[:, -1][:-1] == wrap)          # the documented wrap pair w[o, in-1] ~ w[o+1, 0]
    # "F" order (first axis fastest) couples w[o, i] with w[o+1, i] instead
    optf = ao.sonew(0.1, band=1, eps=1e-3, flatten_order="F")
    sf = optf.init(p)
    g = np.repeat(rng.normal(size=(out_, 1)), in_, axis=1)
    _, sf = optf.update(g, sf, p)
    ef = sf["band"][0][:, 1].reshape(in_, out_)  # F-flat index i*out + o
    np.testing.assert_allclose(ef[:, :-1], (1 - 0.999) * g[:-1, :].T * g[1:, :].T)


def test_o17_numba_kernel_matches_reference_and_is_selected():
    from arrayopt._xp import resolve

    rng = np.random.default_rng(3)
    for b in (0, 1, 2, 4):
        for dtype, rtol in (("float64", 1e-12), ("float32", 1e-5)):
            opt = ao.sonew(0.01, band=b, eps=1e-2)
            p0 = rng.normal(size=40000).astype(dtype)
            grads = [rng.normal(size=40000).astype(dtype) for _ in range(3)]
            res = []
            for backend in ("numba_cpu", "reference"):
                p = p0.copy()
                st_ = opt.init(p)
                if backend == "numba_cpu":
                    chosen = ao.dispatch.select("sonew", resolve(p), [p], [p], st_["mu"], st_["band"])
                    assert chosen is not None and chosen.name == "numba_cpu"
                with ao.dispatch.use_backend(backend):
                    for g in grads:
                        p, st_ = opt.step(p, g, st_)
                res.append((p, st_))
            np.testing.assert_allclose(res[0][0], res[1][0], rtol=rtol, atol=rtol * 1e-2)
            np.testing.assert_allclose(res[0][1]["band"][0], res[1][1]["band"][0], rtol=rtol, atol=1e-30)


def _rank_one_run(lib, dtype, band, steps, eps):
    """Rank-one gradients (g = c_t · v, fixed v with zeros and a huge dynamic range), tiny eps."""
    rng = np.random.default_rng(4)
    v = rng.normal(size=64) * np.logspace(-6, 2, 64)
    v[::7] = 0.0
    opt = ao.sonew(1e-3, band=band, eps=eps, graft="adam")
    none = ao.sonew(1e-3, band=band, eps=eps, graft="none")
    if lib == "torch":
        import torch

        p = {"w": torch.zeros(64, dtype=getattr(torch, dtype))}
        cs = torch.tensor(rng.normal(size=steps))
        vt = torch.tensor(v)
        mk = lambda c: {"w": (c * vt).to(getattr(torch, dtype))}  # noqa: E731
        fin = lambda x: bool(torch.isfinite(x.float()).all())  # noqa: E731
    else:
        p = {"w": np.zeros(64, dtype)}
        cs = rng.normal(size=steps)
        mk = lambda c: {"w": (c * v).astype(dtype)}  # noqa: E731
        fin = lambda x: bool(np.all(np.isfinite(x)))  # noqa: E731
    s, s2 = opt.init(p), none.init(p)
    for t in range(steps):
        g = mk(cs[t])
        u, s = opt.update(g, s, p)
        u2, s2 = none.update(g, s2, p)
        assert fin(u["w"]) and fin(u2["w"]), t
    return s


@pytest.mark.slow
@pytest.mark.parametrize("band", [1, 4])
def test_float32_rank_one_gradients_tiny_eps_10k_steps_stay_finite(band):
    s = _rank_one_run("numpy", "float32", band, 10_000, 1e-12)
    assert int(s["removed_edges"][0]) > 0   # the stability rule had work to do, and says so


@pytest.mark.slow
def test_bfloat16_rank_one_gradients_stay_finite():
    pytest.importorskip("torch")
    s = _rank_one_run("torch", "bfloat16", 1, 2_000, 1e-12)
    assert s["band"][0].dtype.__str__().endswith("float32")


def test_state_counts_and_memory():
    p = {"w": np.zeros((10, 10), np.float32)}
    for b in (0, 1, 4):
        s = ao.sonew(band=b).init(p)
        assert s["band"][0].shape == (100, b + 1)
        assert ao.state_nbytes(s) >= 4 * 100 * (b + 2)
        assert int(s["removed_edges"][0]) == 0 and int(s["fallback_rows"][0]) == 0
