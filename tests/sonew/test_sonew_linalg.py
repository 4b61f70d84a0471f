"""Oracles O1–O12 (``docs/sonew.md``) for ``arrayopt.sonew.math.sonew_factor`` / ``sonew_apply``.

The dense references are independent of the closed form: the clique/separator
formula (dense inverses of every window) and a direct Newton minimisation of
``-log det X + tr(X H)`` over the free band entries of ``X``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrayopt.linalg import sonew_apply, sonew_factor
from arrayopt.sonew.math import sonew_factor_guarded

U32 = 2.0 ** -24


def random_h(n, seed, cond=0.1):
    """Dense SPD H = G Gᵀ/(3n) + cond·I."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, 3 * n))
    return g @ g.T / (3 * n) + cond * np.eye(n)


def band_of(H, b):
    n = H.shape[0]
    h = np.zeros((n, b + 1))
    for k in range(min(b, n - 1) + 1):
        h[: n - k, k] = np.diag(H, k)
    return h


def dense_x(psi, s):
    """X = L D Lᵀ assembled densely from the factor."""
    psi, s = np.asarray(psi, np.float64), np.asarray(s, np.float64)
    n, b = psi.shape
    L = np.eye(n)
    for j in range(n):
        for k in range(1, b + 1):
            if j + k < n:
                L[j + k, j] = -psi[j, k - 1]
    return L @ np.diag(1.0 / s) @ L.T


def in_band(n, b):
    i = np.arange(n)
    return np.abs(i[:, None] - i[None, :]) <= b


def clique_separator(H, b):
    """X = Σ_windows pad(H_W⁻¹) − Σ_separators pad(H_S⁻¹) (chordal graph formula)."""
    n = H.shape[0]
    if b >= n - 1:
        return np.linalg.inv(H)
    if b == 0:
        return np.diag(1.0 / np.diag(H))
    X = np.zeros_like(H)
    for j in range(n - b):
        w = slice(j, j + b + 1)
        X[w, w] += np.linalg.inv(H[w, w])
    for j in range(1, n - b):
        sep = slice(j, j + b)
        X[sep, sep] -= np.linalg.inv(H[sep, sep])
    return X


def newton_logdet(H, b, iters=60):
    """Minimise f(X) = −log det X + tr(XH) over symmetric X with support in the band (dense Newton)."""
    n = H.shape[0]
    idx = [(i, j) for i in range(n) for j in range(i, min(n, i + b + 1))]

    def unpack(x):
        X = np.zeros((n, n))
        for v, (i, j) in zip(x, idx):
            X[i, j] = X[j, i] = v
        return X

    def f(x):
        X = unpack(x)
        sign, ld = np.linalg.slogdet(X)
        return np.inf if sign <= 0 else -ld + np.sum(X * H)

    x = np.array([1.0 / H[i, i] if i == j else 0.0 for i, j in idx])
    for _ in range(iters):
        X = unpack(x)
        W = np.linalg.inv(X)
        G = H - W
        grad = np.array([G[i, j] * (1 if i == j else 2) for i, j in idx])
        E = []
        for i, j in idx:
            e = np.zeros((n, n))
            e[i, j] = e[j, i] = 1.0
            E.append(W @ e @ W)
        hess = np.array([[np.sum(Ea * eb) for eb in [_unit(n, i, j) for i, j in idx]] for Ea in E])
        step = np.linalg.solve(hess, grad)
        t, f0 = 1.0, f(x)
        while f(x - t * step) > f0 - 0.25 * t * grad @ step and t > 1e-12:
            t *= 0.5
        x = x - t * step
        if np.linalg.norm(grad) < 1e-14:
            break
    return unpack(x)


def _unit(n, i, j):
    e = np.zeros((n, n))
    e[i, j] = e[j, i] = 1.0
    return e


cases = st.tuples(st.integers(1, 16), st.integers(0, 5), st.integers(0, 2**16),
                  st.sampled_from([1e-3, 0.1, 1.0]))


@given(cases)
@settings(max_examples=40)
def test_o1_to_o5_kkt_trace_logdet_f64(case):
    n, b, seed, cond = case
    H = random_h(n, seed, cond)
    psi, s = sonew_factor(band_of(H, b))
    X = dense_x(psi, s)
    mask = in_band(n, b)
    assert np.all(X[~mask] == 0)                                     # O1 support, exactly
    assert np.all(s > 0) and np.linalg.eigvalsh(X).min() > 0         # O2 PD
    W = np.linalg.inv(X)
    assert np.abs(W - H)[mask].max() <= 1e-10 * np.abs(H).max() * max(1.0, 1 / cond) ** 0.5  # O3
    assert abs(np.trace(X @ H) - n) <= 1e-10 * n * max(1.0, 1 / cond) ** 0.5               # O4
    sign, ld = np.linalg.slogdet(X)
    assert sign > 0 and abs(ld + np.sum(np.log(s))) <= 1e-12 * max(1.0, abs(ld)) * 1e2     # O5


@given(st.integers(2, 9), st.integers(1, 4), st.integers(0, 2**16))
@settings(max_examples=12)
def test_o6_dense_solvers_agree(n, b, seed):
    H = random_h(n, seed)
    X = dense_x(*sonew_factor(band_of(H, b)))
    np.testing.assert_allclose(X, clique_separator(H, b), rtol=1e-8, atol=1e-10)
    if n <= 7:
        np.testing.assert_allclose(X, newton_logdet(H, b), rtol=1e-8, atol=1e-9)


def test_o6_max_determinant_completion():
    """W = X⁻¹ is the max-det completion: perturbing an off-band entry lowers log det W."""
    H = random_h(8, 3)
    X = dense_x(*sonew_factor(band_of(H, 2)))
    W = np.linalg.inv(X)
    ld = np.linalg.slogdet(W)[1]
    for i, j in [(0, 4), (1, 7), (2, 6)]:
        for d in (1e-3, -1e-3):
            W2 = W.copy()
            W2[i, j] += d
            W2[j, i] += d
            assert np.linalg.slogdet(W2)[1] < ld


@given(cases)
@settings(max_examples=25)
def test_o7_reversal_invariance(case):
    n, b, seed, cond = case
    H = random_h(n, seed, cond)
    R = np.eye(n)[::-1]
    X = dense_x(*sonew_factor(band_of(H, b)))
    Xr = dense_x(*sonew_factor(band_of(R @ H @ R, b)))
    np.testing.assert_allclose(X, R @ Xr @ R, rtol=1e-10 / min(cond, 1), atol=1e-12 / min(cond, 1))


@given(st.integers(1, 12), st.integers(0, 2**16))
@settings(max_examples=20)
def test_o8_special_cases(n, seed):
    H = random_h(n, seed)
    np.testing.assert_allclose(dense_x(*sonew_factor(band_of(H, 0))), np.diag(1 / np.diag(H)), rtol=1e-15)
    np.testing.assert_allclose(dense_x(*sonew_factor(band_of(H, n - 1 + seed % 3))), np.linalg.inv(H),
                               rtol=1e-9, atol=1e-11)
    # b = 1: explicit symmetric formula with the 2×2 minors Δ_j
    X = dense_x(*sonew_factor(band_of(H, 1)))
    d, e = np.diag(H), np.diag(H, 1)
    delta = d[:-1] * d[1:] - e ** 2
    want = np.diag(1 / d)
    for j in range(n - 1):
        want[j, j + 1] = want[j + 1, j] = -e[j] / delta[j]
        want[j, j] += e[j] ** 2 / (d[j] * delta[j])
        want[j + 1, j + 1] += e[j] ** 2 / (d[j + 1] * delta[j])
    np.testing.assert_allclose(X, want, rtol=1e-12, atol=1e-14)
    one = sonew_factor(np.array([[H[0, 0]] + [0.0] * 3]))
    assert dense_x(*one)[0, 0] == pytest.approx(1 / H[0, 0], rel=1e-15)


@given(cases, st.floats(1e-3, 1e3))
@settings(max_examples=20)
def test_o9_scaling_equivariance(case, c):
    n, b, seed, cond = case
    H = random_h(n, seed, cond)
    X = dense_x(*sonew_factor(band_of(H, b)))
    np.testing.assert_allclose(dense_x(*sonew_factor(band_of(c * H, b))), X / c, rtol=1e-10 / min(cond, 1),
                               atol=1e-13 / c)
    S = np.diag(np.random.default_rng(seed).uniform(0.2, 5, n))
    Si = np.linalg.inv(S)
    np.testing.assert_allclose(dense_x(*sonew_factor(band_of(S @ H @ S, b))), Si @ X @ Si,
                               rtol=1e-9 / min(cond, 1), atol=1e-11 / min(cond, 1))


@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 4), st.integers(0, 2**16))
@settings(max_examples=20)
def test_o10_separability(n1, n2, b, seed):
    H1, H2 = random_h(n1, seed), random_h(n2, seed + 1)
    H = np.block([[H1, np.zeros((n1, n2))], [np.zeros((n2, n1)), H2]])
    X = dense_x(*sonew_factor(band_of(H, b)))
    np.testing.assert_allclose(X[:n1, :n1], dense_x(*sonew_factor(band_of(H1, b))), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(X[n1:, n1:], dense_x(*sonew_factor(band_of(H2, b))), rtol=1e-12, atol=1e-14)
    assert np.all(X[:n1, n1:] == 0)


@given(st.integers(8, 64), st.integers(0, 2**16), st.sampled_from([1e-12, 1e-9, 1e-7]))
@settings(max_examples=25)
def test_o11_edge_removal_rank_one_float32(n, seed, eps):
    g = np.random.default_rng(seed).normal(size=n)
    H = np.outer(g, g) + eps * np.max(g * g) * np.eye(n)
    h32 = band_of(H, 1).astype(np.float32)
    tau = 4 * U32
    psi, s, kept = sonew_factor_guarded(h32, tau)
    assert psi.dtype == np.float32 and np.all(s > 0) and np.all(np.isfinite(psi))
    removed = int(np.sum(np.minimum(1, n - 1 - np.arange(n)) - np.minimum(kept, 1)))
    # X equals the float64 closed form on the pruned graph (same ψ mask, same f32 inputs):
    # ψ_j = 0 cuts the path into independent blocks, each solved exactly in float64
    h64 = h32.astype(np.float64)
    h64[:, 1] = np.where(kept >= 1, h64[:, 1], 0.0)
    X64 = dense_x(*sonew_factor(h64))
    X32 = dense_x(psi, s)
    # the kept Schur complements are s_j > τ H_jj, so f32 rounding of s_j is at most ~2u H_jj / s_j ≤ 2u/τ
    rel = np.abs(X32 - X64).max() / np.abs(X64).max()
    kappa = np.linalg.cond(X64)
    assert rel <= max(1e-5, 50 * kappa * U32), (rel, kappa, removed)


@given(cases, st.sampled_from(["float64", "float32"]))
@settings(max_examples=30)
def test_o12_matvec_and_float32_error_scales_with_condition(case, dtype):
    n, b, seed, cond = case
    H = random_h(n, seed, cond)
    psi, s = sonew_factor(band_of(H, b))
    X = dense_x(psi, s)
    rng = np.random.default_rng(seed + 7)
    v, w = rng.normal(size=n), rng.normal(size=n)
    np.testing.assert_allclose(sonew_apply(psi, s, v), X @ v, rtol=1e-12, atol=1e-12 * np.abs(X @ v).max())
    np.testing.assert_allclose(sonew_apply(psi, s, 2 * v - 3 * w),
                               2 * sonew_apply(psi, s, v) - 3 * sonew_apply(psi, s, w), rtol=1e-10, atol=1e-10)
    if dtype == "float32":
        p32, s32 = sonew_factor(band_of(H, b).astype(np.float32))
        y32 = sonew_apply(p32, s32, v.astype(np.float32))
        assert y32.dtype == np.float32
        kappa = np.linalg.cond(X)
        err = np.linalg.norm(y32 - X @ v) / np.linalg.norm(X @ v)
        assert err <= 50 * kappa * U32, (err, kappa)


@pytest.mark.parametrize("lib", ["array_api_strict", "torch", "jax"])
def test_factor_and_apply_on_other_namespaces(lib):
    pytest.importorskip(lib)
    from _arrays import asarray, to_numpy

    H = random_h(11, 5)
    for b in (0, 1, 3):
        h = band_of(H, b)
        psi, s = sonew_factor(h)
        v = np.arange(11.0)
        want = sonew_apply(psi, s, v)
        p2, s2 = sonew_factor(asarray(lib, h))
        got = sonew_apply(p2, s2, asarray(lib, v))
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="h: expected shape"):
        sonew_factor(np.ones(3))
    with pytest.raises(ValueError, match="psi, s, v"):
        sonew_apply(np.ones((3, 1)), np.ones(3), np.ones(4))


@pytest.mark.parametrize("lib", ["numpy", "array_api_strict", "torch", "jax"])
@pytest.mark.parametrize("b", [0, 1, 7, 12])
def test_band_rowsum_max_sums_each_row_in_the_kernels_order(lib, b):
    """Row sums in one fixed order (diagonal, upper k = 1..b, lower k = 1..b), whatever the
    library: NumPy's own row sum is pairwise from eight entries on, which made the relative ε
    (and so the whole step) differ in the last bits from the kernels for b >= 7."""
    pytest.importorskip(lib) if lib != "numpy" else None
    from _arrays import asarray, to_numpy

    from arrayopt.sonew.math import band_rowsum_max

    rng = np.random.default_rng(b)
    n = 3000
    h = rng.standard_normal((n, b + 1)).astype(np.float32)
    a = np.abs(h)
    r = a[:, 0].copy()
    for k in range(1, b + 1):  # upper part, past-the-end entries masked
        r = r + np.where(np.arange(n) + k < n, a[:, k], np.float32(0))
    for k in range(1, b + 1):  # lower part: |H_{j, j-k}| = |h[j-k, k]|
        r[k:] = r[k:] + a[: n - k, k]
    got = to_numpy(band_rowsum_max(asarray(lib, h)))
    assert got == float(r.max())
