"""Frequent Directions (``fd_update``) and the low-rank inverse power (``lowrank_apply``) against
their oracles (F1–F2 and oracles K1–K8 in docs/sketchy.md), float64 unless noted.

Code rank ``k`` is the paper's ``ℓ = k + 1``: the shrink subtracts the (k+1)-th eigenvalue.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrayopt.linalg import fd_update, lowrank_apply
from arrayopt.sketchy.math import inverse_factors


def _stream(rng, d, T, m, decay):
    """T batches of m columns with per-coordinate scales i^(-decay) (a decaying spectrum)."""
    scales = np.arange(1, d + 1) ** (-decay)
    return [rng.normal(size=(d, m)) * scales[:, None] for _ in range(T)]


def _run(xs, k, beta2=1.0, tail_decay="beta2"):
    d = xs[0].shape[0]
    U, sv, tail = np.zeros((d, k)), np.zeros(k), np.zeros(())
    escaped = []
    for x in xs:
        s = fd_update(U, sv, tail, x, beta2=beta2, tail_decay=tail_decay)
        assert bool(s.ok)
        U, sv, tail = s.eigvecs, s.sv, s.tail
        escaped.append(float(s.escaped))
    return s, np.array(escaped)


def _dense_fd(xs, k, beta2):
    """Algorithm 1 on the d×d matrices: eigh(β₂Ḡ + XXᵀ), subtract the (k+1)-th eigenvalue."""
    d = xs[0].shape[0]
    G = np.zeros((d, d))
    for x in xs:
        w, q = np.linalg.eigh(beta2 * G + x @ x.T)
        w, q = w[::-1], q[:, ::-1]
        cut = w[k] if k < d else 0.0
        G = (q[:, :k] * np.maximum(w[:k] - cut, 0)) @ q[:, :k].T
    return G


def _weighted_sum(vals, beta2):
    T = len(vals)
    return sum(beta2 ** (T - 1 - t) * v for t, v in enumerate(vals))


@given(d=st.integers(3, 12), k=st.integers(1, 12), m=st.integers(1, 3), T=st.integers(1, 30),
       decay=st.floats(0.0, 2.0), beta2=st.sampled_from([1.0, 0.99, 0.9]),
       tail_decay=st.sampled_from(["beta2", "sqrt"]), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_fd_sandwich_rank_lemma1_trace_and_ema_forms(d, k, m, T, decay, beta2, tail_decay, seed):
    """K1 sandwich 0 ⪯ G−Ḡ ⪯ ρI, rank ≤ k, K2 Lemma 1, K3 trace accounting, K4 EMA forms
    (β₂-weighted target and tail; the √β₂ tail is larger), K6 the dense Algorithm 1."""
    k = min(k, d)
    xs = _stream(np.random.default_rng(seed), d, T, m, decay)
    s, escaped = _run(xs, k, beta2, tail_decay)
    G = _weighted_sum([x @ x.T for x in xs], beta2)
    sketch = (s.eigvecs * s.sv ** 2) @ s.eigvecs.T
    rho = _weighted_sum(list(escaped), beta2)
    scale = np.linalg.norm(G, 2)
    np.testing.assert_allclose(sketch, _dense_fd(xs, k, beta2), rtol=1e-8, atol=1e-10 * scale)
    E = np.linalg.eigvalsh(G - sketch)
    assert E[0] >= -1e-10 * scale
    assert E[-1] <= rho * (1 + 1e-10) + 1e-12 * scale
    assert np.sum(s.sv > 1e-10 * np.sqrt(scale)) <= k
    lam = np.linalg.eigvalsh(G)[::-1]
    ell = k + 1
    omega = min(lam[j:].sum() / (ell - j) for j in range(ell))
    assert rho <= omega * (1 + 1e-10) + 1e-12 * scale
    assert np.trace(G) - np.trace(sketch) >= ell * rho * (1 - 1e-10) - 1e-12 * scale
    if tail_decay == "beta2":
        np.testing.assert_allclose(float(s.tail), rho, rtol=1e-10, atol=1e-12 * scale)
    else:
        sqrt_tail = _weighted_sum(list(escaped), np.sqrt(beta2))
        np.testing.assert_allclose(float(s.tail), sqrt_tail, rtol=1e-10, atol=1e-12 * scale)
        assert float(s.tail) >= rho * (1 - 1e-12)
    # undeflated eigenvalues: Uᵀ G̃ U on the kept directions (K5)
    Gt = sketch + float(s.tail) * np.eye(d)
    keep = s.sv > 0
    np.testing.assert_allclose(np.diag(s.eigvecs.T @ Gt @ s.eigvecs)[keep], s.undeflated[keep],
                               rtol=1e-10, atol=1e-12 * scale)


@given(d=st.integers(3, 10), k=st.integers(1, 5), T=st.integers(2, 30), beta2=st.sampled_from([0.9, 0.99]),
       seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_ema_fd_is_scaled_plain_fd_of_the_rescaled_stream(d, k, T, beta2, seed):
    """K4: EMA-FD on g_t equals β₂^T × FD (β₂ = 1) on β₂^(−t/2) g_t (the shrink is homogeneous)."""
    k = min(k, d)
    xs = _stream(np.random.default_rng(seed), d, T, 1, 1.0)
    ema, _ = _run(xs, k, beta2, "beta2")
    plain, _ = _run([x * beta2 ** (-(t + 1) / 2) for t, x in enumerate(xs)], k, 1.0)
    c = beta2 ** T
    np.testing.assert_allclose((ema.eigvecs * ema.sv ** 2) @ ema.eigvecs.T,
                               c * (plain.eigvecs * plain.sv ** 2) @ plain.eigvecs.T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(ema.tail), c * float(plain.tail), rtol=1e-9, atol=1e-12)


@given(d=st.integers(3, 12), r=st.integers(1, 6), T=st.integers(1, 25), seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_low_rank_streams_are_sketched_exactly(d, r, T, seed):
    """K6 exactness: a stream of rank r ≤ k escapes nothing and Ḡ_T = G_T."""
    rng = np.random.default_rng(seed)
    r = min(r, d)
    basis = np.linalg.qr(rng.normal(size=(d, r)))[0]
    xs = [basis @ rng.normal(size=(r, 1)) for _ in range(T)]
    s, escaped = _run(xs, r)
    G = sum(x @ x.T for x in xs)
    assert np.all(np.abs(escaped) <= 1e-12 * np.linalg.norm(G, 2))
    np.testing.assert_allclose((s.eigvecs * s.sv ** 2) @ s.eigvecs.T, G, rtol=1e-10, atol=1e-12 * np.abs(G).max())


def _dense_power(U, mu, tail, alpha, eps_a):
    """Dense ``(G̃ + ε_a I)^(−α)`` by eigh, pseudo-inverse (zero eigenvalues stay 0)."""
    d = U.shape[0]
    Gt = (U * mu) @ U.T + tail * (np.eye(d) - U @ U.T) + eps_a * np.eye(d)
    w, q = np.linalg.eigh(Gt)
    tol = 1e-12 * max(w.max(), 1e-300)
    inv = np.where(w > tol, np.abs(w) ** (-alpha), 0.0)
    return (q * inv) @ q.T


@given(d=st.integers(2, 12), k=st.integers(1, 6), T=st.integers(1, 20), alpha=st.sampled_from([0.5, 0.25, 1 / 6]),
       eps=st.sampled_from([0.0, 1e-3]), relative=st.booleans(), cols=st.integers(1, 4),
       dtype=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_lowrank_apply_equals_the_dense_pseudo_inverse_power(d, k, T, alpha, eps, relative, cols, dtype, seed):
    """K7: the O(dk) apply (F2) equals the dense eigh-based power, for vectors and batches of columns."""
    k = min(k, d)
    rng = np.random.default_rng(seed)
    s, _ = _run(_stream(rng, d, T, 1, 0.5), k)
    v = rng.normal(size=(d, cols))
    eps_a = eps * float(np.max(s.undeflated)) if relative else eps
    if float(s.tail) == 0 and eps_a > 0:  # the complement keeps inverse 0 while the tail is 0
        eps_a, eps = 0.0, 0.0
    want = _dense_power(s.eigvecs, s.undeflated, float(s.tail), alpha, eps_a) @ v
    c = lambda a: np.asarray(a, dtype)  # noqa: E731
    got = lowrank_apply(c(s.eigvecs), c(s.undeflated), c(s.tail), c(v), alpha=alpha, eps=eps, relative=relative)
    assert got.dtype == np.dtype(dtype)
    rtol = 1e-10 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    got1 = lowrank_apply(s.eigvecs, s.undeflated, s.tail, v[:, 0], alpha=alpha, eps=eps, relative=relative)
    np.testing.assert_allclose(got1, (want[:, 0] if dtype == "float64" else got1), rtol=1e-10,
                               atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_tearfree_exponent_check(order):
    """K8 (tearfree's unit test): a single entry 2^n, rank 1, β₂ = 1, ε = 0 gives ι = 1/2."""
    d = 4
    x = np.zeros((d, d ** (order - 1)))
    x[0, 0] = 2.0 ** order
    s = fd_update(np.zeros((d, 1)), np.zeros(1), np.zeros(1), x)
    inv, inv_tail = inverse_factors(s.undeflated, s.tail, alpha=1 / (2 * order), mask=s.sv > 0)
    np.testing.assert_allclose(inv, [0.5], atol=1e-6)
    assert float(inv_tail[0]) == 0.0


@pytest.mark.parametrize("relative", [True, False])
def test_tearfree_epsilon_check(relative):
    """K8: prior tail 4, entry 2, ε = 1e-3, order 2: ι = ((4+4)(1+ε))^(−1/4) relative, (8+ε)^(−1/4) absolute."""
    x = np.zeros((4, 4))
    x[0, 0] = 2.0
    s = fd_update(np.zeros((4, 1)), np.zeros(1), np.full(1, 4.0), x)
    inv, inv_tail = inverse_factors(s.undeflated, s.tail, alpha=0.25, eps=1e-3, relative=relative, mask=s.sv > 0)
    eps_a = 1e-3 * 8.0 if relative else 1e-3
    np.testing.assert_allclose(inv, [(8.0 + eps_a) ** -0.25], rtol=1e-12)
    np.testing.assert_allclose(inv_tail, [(4.0 + eps_a) ** -0.25], rtol=1e-12)


def test_nonfinite_input_keeps_the_sketch_and_reports_it():
    rng = np.random.default_rng(0)
    s, _ = _run(_stream(rng, 6, 5, 2, 1.0), 2)
    for bad in (np.nan, np.inf):
        x = rng.normal(size=(6, 2))
        x[3, 1] = bad
        t = fd_update(s.eigvecs, s.sv, s.tail, x)
        assert not bool(t.ok) and float(t.escaped) == 0.0
        for a, b in ((t.eigvecs, s.eigvecs), (t.sv, s.sv), (t.tail, s.tail)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(t.undeflated, s.undeflated, rtol=1e-12)
    # an overflowing update (σ² = inf in float32) is rejected the same way
    big = np.full((6, 1), 3e19, np.float32)
    z = [np.zeros((6, 2), np.float32), np.zeros(2, np.float32), np.zeros(1, np.float32)]
    t = fd_update(*z, big)
    assert not bool(t.ok) and not np.any(t.sv) and not np.any(t.tail)


def test_bad_arguments_are_named():
    U, sv, tail = np.zeros((4, 2)), np.zeros(2), np.zeros(())
    with pytest.raises(ValueError, match="beta2: expected a number in"):
        fd_update(U, sv, tail, np.ones(4), beta2=0.0)
    with pytest.raises(ValueError, match="tail_decay: must be one of"):
        fd_update(U, sv, tail, np.ones(4), tail_decay="half")
    with pytest.raises(ValueError, match=r"x: expected shape \(4,\) or \(4, m\)"):
        fd_update(U, sv, tail, np.ones(5))
    with pytest.raises(ValueError, match="eigvecs: rank k = 5"):
        fd_update(np.zeros((4, 5)), np.zeros(5), tail, np.ones(4))
    with pytest.raises(TypeError, match="dtypes must equal"):
        fd_update(U, sv, tail, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="alpha: expected a finite number"):
        lowrank_apply(U, sv, tail, np.ones(4), alpha=float("nan"))
    with pytest.raises(ValueError, match="v: expected 4 rows"):
        lowrank_apply(U, sv, tail, np.ones(3), alpha=0.5)


def _gram_lib(lib):
    """``(to, back)``: arrays of ``lib`` (the Gram routes: NumPy's host route, torch's batched one)."""
    if lib == "numpy":
        return np.asarray, np.asarray
    torch = pytest.importorskip("torch", reason="torch runs its own Gram route (batched eigh)")
    return torch.from_numpy, lambda t: t.numpy()


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype, d", [("float64", 256), ("float32", 256), ("float32", 300)],
                         ids=["float64-wide", "float32-wide", "float32-tall"])
def test_gram_routes_match_the_qr_svd_route(dtype, d, lib):
    """The Gram routes (float64: ``zzᵀ`` of a wide ``z``; float32: ``zzᵀ`` or, tall, ``zᵀz``, then a
    Rayleigh–Ritz step; only the top k+1 pairs; NumPy by ``syevr`` per matrix, torch by a batched full
    ``eigh``) give the sketch of the QR + SVD route (array-api-strict runs the latter) to float
    rounding, on a spectrum the float32 Gram resolves (σ² ∝ i⁻²)."""
    xps = pytest.importorskip("array_api_strict", reason="array-api-strict runs the QR + SVD route")
    to, back = _gram_lib(lib)
    sketch = __import__("importlib").import_module("arrayopt.sketchy.math")
    rng = np.random.default_rng(5)
    k, m = 8, 256
    state = [np.zeros((d, k), dtype), np.zeros(k, dtype), np.zeros(1, dtype)]
    for _ in range(2):
        x = (rng.normal(size=(d, m)) * np.arange(1, d + 1)[:, None] ** -1.0).astype(dtype)
        a = [back(v) for v in fd_update(*[to(v) for v in state], to(x), beta2=0.99)[:4]]
        b = fd_update(*[xps.asarray(v) for v in state], xps.asarray(x), beta2=0.99)
        rtol = 1e-9 if dtype == "float64" else 2e-4
        for got, want in zip(a, b[:4]):
            np.testing.assert_allclose(got, np.asarray(want), rtol=rtol, atol=rtol * np.abs(np.asarray(want)).max())
        state = a[:3]
    assert sketch._gram_route(d, m + k, k, np.dtype(dtype))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("d, m", [(256, 256), (300, 256)], ids=["wide", "tall"])
def test_float32_gram_routes_are_normwise_accurate_on_steep_spectra(d, m, lib):
    """A float32 Gram resolves eigenvalues only down to ``u₃₂‖Z‖²`` (a float32 SVD: ``u₃₂σ₁σ_j``): on a
    spectrum σ_j² ∝ j⁻⁴ the sketch Ḡ', the tail ρ' and the FD sandwich still hold normwise at float32
    tolerance, ``‖Ḡ'₃₂ − Ḡ'₆₄‖ ≤ 1e-5‖Z‖²`` (F1a in docs/sketchy.md)."""
    rng = np.random.default_rng(7)
    k = 16
    scales = np.arange(1, d + 1)[:, None] ** -2.0
    s32 = [np.zeros((d, k), np.float32), np.zeros(k, np.float32), np.zeros(1, np.float32)]
    s64 = [np.zeros((d, k)), np.zeros(k), np.zeros(1)]
    G = np.zeros((d, d))
    to, back = _gram_lib(lib)
    for _ in range(2):
        x = (rng.normal(size=(d, m)) * scales).astype(np.float32)
        a = fd_update(*[to(v) for v in s32], to(x), beta2=0.99)
        a = a._replace(**{f: back(getattr(a, f)) for f in ("eigvecs", "sv", "tail")})
        b = fd_update(*s64, x.astype(np.float64), beta2=0.99)
        s32, s64 = [a.eigvecs, a.sv, a.tail], [b.eigvecs, b.sv, b.tail]
        G = 0.99 * G + x.astype(np.float64) @ x.T.astype(np.float64)
        scale = np.linalg.norm(G, 2)
        sk32 = (a.eigvecs.astype(np.float64) * a.sv.astype(np.float64) ** 2) @ a.eigvecs.T
        sk64 = (b.eigvecs * b.sv ** 2) @ b.eigvecs.T
        assert np.linalg.norm(sk32 - sk64, 2) <= 1e-5 * scale
        assert abs(float(a.tail[0]) - float(b.tail[0])) <= 1e-5 * scale
        w = np.linalg.eigvalsh(G - sk32)  # 0 ⪯ G − Ḡ ⪯ ρ I, to float32 rounding of ‖G‖
        assert w.min() >= -1e-5 * scale and w.max() <= float(a.tail[0]) + 1e-5 * scale
        assert np.abs(a.eigvecs.T @ a.eigvecs - np.diag((a.sv > 0).astype(np.float32))).max() < 1e-5
    sketch = __import__("importlib").import_module("arrayopt.sketchy.math")
    assert sketch._gram_route(d, m + k, k, np.dtype("float32")) and (m + k < d) == (d == 300)
