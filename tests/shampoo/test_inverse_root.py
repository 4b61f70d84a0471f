"""Oracles R1–R8 (``docs/shampoo.md``) for arrayopt.linalg.inverse_pth_root."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _arrays import asarray, have, to_numpy
from arrayopt.linalg import inverse_pth_root
from arrayopt.linalg.roots import host_inverse_pth_roots, inverse_pth_root_info, power_iteration


def spd(n, seed, cond=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2 * n))
    a = x @ x.T / (2 * n) + 1e-3 * np.eye(n)
    if cond is not None:
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        a = (q * np.geomspace(1.0, 1.0 / cond, n)) @ q.T
    return 0.5 * (a + a.T)


def eigh_ref(a, p, eps):
    w, q = np.linalg.eigh(a)
    w = np.maximum(w, 0)
    return (q * (w + eps * w.max()) ** (-1.0 / p)) @ q.T


@given(n=st.integers(1, 48), p=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 1000),
       method=st.sampled_from(["eigh", "newton"]))
@settings(max_examples=30)
def test_root_matches_eigh_in_float64(n, p, seed, method):
    a = spd(n, seed)
    r = inverse_pth_root(a, p, ridge_epsilon=1e-6, method=method)
    ref = eigh_ref(a, p, 1e-6)
    assert np.abs(r - ref).max() / np.abs(ref).max() < 1e-5
    np.testing.assert_allclose(r, r.T, rtol=0, atol=1e-12 * np.abs(r).max())  # oracle R2
    ab = a + 1e-6 * np.linalg.eigvalsh(a).max() * np.eye(n)
    assert np.abs(np.linalg.matrix_power(r, p) @ ab - np.eye(n)).max() < 1e-6


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_newton_accuracy_at_high_condition_number(p):
    a = spd(64, 1, cond=1e6)
    r, info = inverse_pth_root_info(a, p, ridge_epsilon=1e-6, method="newton")
    ref = eigh_ref(a, p, 1e-6)
    assert np.abs(r - ref).max() / np.abs(ref).max() < 1e-5
    a32 = a.astype(np.float32)
    r32, info32 = inverse_pth_root_info(a32, p, ridge_epsilon=1e-6, method="newton", compute_dtype="float32")
    assert r32.dtype == np.float32
    assert np.abs(r32 - ref).max() / np.abs(ref).max() < 5e-2
    ab = a + 1e-6 * np.eye(64)
    assert np.abs(np.linalg.matrix_power(r32.astype(np.float64), p) @ ab - np.eye(64)).max() < 0.1


def test_scalar_diagonal_and_identity_cases_exact():
    for p in (1, 2, 4):
        a = np.array([[3.0]])
        np.testing.assert_allclose(inverse_pth_root(a, p, ridge_epsilon=1e-3), (3.0 * 1.001) ** (-1 / p))
        d = np.diag([1.0, 4.0, 9.0])
        np.testing.assert_allclose(np.diag(inverse_pth_root(d, p, ridge_epsilon=0.0)),
                                   np.array([1.0, 4.0, 9.0]) ** (-1 / p), rtol=1e-12)
        c = 2.5
        np.testing.assert_allclose(inverse_pth_root(c * np.eye(5), p, ridge_epsilon=1e-2),
                                   (c * 1.01) ** (-1 / p) * np.eye(5), rtol=1e-12, atol=1e-15)
    # a zero matrix has no scale: the identity (relative ridge)
    np.testing.assert_array_equal(inverse_pth_root(np.zeros((3, 3)), 4), np.eye(3))


@given(c=st.floats(1e-3, 1e3), p=st.sampled_from([2, 4]), seed=st.integers(0, 100),
       method=st.sampled_from(["eigh", "newton"]))
@settings(max_examples=15)
def test_relative_ridge_scale_covariance(c, p, seed, method):
    a = spd(12, seed)
    r1 = inverse_pth_root(c * a, p, method=method)
    r0 = inverse_pth_root(a, p, method=method)
    np.testing.assert_allclose(r1, c ** (-1 / p) * r0, rtol=1e-6, atol=1e-9 * np.abs(r0).max())


def test_batched_equals_per_matrix():
    a = np.stack([spd(6, s) for s in range(4)]).reshape(2, 2, 6, 6)
    for method in ("eigh", "newton"):
        r = inverse_pth_root(a, 4, method=method)
        assert r.shape == (2, 2, 6, 6)
        for i in range(2):
            for j in range(2):
                np.testing.assert_allclose(r[i, j], inverse_pth_root(a[i, j], 4, method=method), rtol=1e-7, atol=1e-12)


def test_failure_fallbacks_and_nan_never_escape():
    a = spd(8, 0)
    bad = a.copy()
    bad[0, 0] = np.nan
    r, info = inverse_pth_root_info(bad, 4, method="newton")
    assert not info["ok"] and np.all(np.isfinite(r))
    with pytest.raises(ArithmeticError, match="root failed"):
        inverse_pth_root(bad, 4)
    # a Newton run that cannot reach the error threshold falls back to eigh
    r, info = inverse_pth_root_info(a, 4, method="newton", max_iterations=1, failure_threshold=1e-12)
    assert info["fallbacks"] == 1 and info["ok"] and info["method"] == "eigh"
    np.testing.assert_allclose(r, eigh_ref(a, 4, 1e-6), rtol=1e-10)
    roots, ok, fb = host_inverse_pth_roots([a, bad], [4, 4], ridge_epsilon=1e-6, method="newton")
    assert ok == [True, False] and roots[1] is None and fb == 1


def test_power_iteration():
    a = np.diag(np.array([10.0, 1.0, 0.5, 0.1]))
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))
    lam = float(power_iteration(q @ a @ q.T))
    assert abs(lam - 10.0) <= 1e-4 * 10.0


def test_bad_arguments_are_named():
    a = spd(3, 0)
    with pytest.raises(ValueError, match="p: expected a positive number"):
        inverse_pth_root(a, 0)
    with pytest.raises(ValueError, match="p: method='newton' needs an integer"):
        inverse_pth_root(a, 2.5, method="newton")
    with pytest.raises(ValueError, match="ridge_epsilon"):
        inverse_pth_root(a, 2, ridge_epsilon=-1.0)
    with pytest.raises(ValueError, match="method: must be one of"):
        inverse_pth_root(a, 2, method="svd")
    with pytest.raises(ValueError, match="A: expected square"):
        inverse_pth_root(np.ones((2, 3)), 2)
    # fractional roots work with eigh
    np.testing.assert_allclose(inverse_pth_root(np.diag([4.0]), 0.5, ridge_epsilon=0.0), [[1 / 16]])


@pytest.mark.parametrize("lib", ["torch", "jax", "array_api_strict"])
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_namespaces_match_numpy(lib, method):
    if not have(lib):
        pytest.skip(f"{lib} not installed")
    a = spd(10, 3)
    want = inverse_pth_root(a, 4, method=method)
    got = inverse_pth_root(asarray(lib, a, "float64"), 4, method=method)
    assert type(got).__module__.split(".")[0] == (lib if lib != "jax" else "jaxlib") or lib == "jax"
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-7, atol=1e-10)
    got32 = inverse_pth_root(asarray(lib, a, "float32"), 4, method=method)
    assert "float32" in str(got32.dtype)
    np.testing.assert_allclose(to_numpy(got32), want, rtol=5e-3, atol=1e-4)


def test_ridge_escalation_newton_converges_at_a_larger_ridge():
    """Oracle R7 (JAX ridge escalation): fails at ε, converges at ε·10^i with retries = i."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    A = (q * np.geomspace(1.0, 1e-12, 6)) @ q.T
    kw = dict(ridge_epsilon=1e-14, method="newton", max_iterations=30, failure_threshold=1e-3)
    _, info0 = inverse_pth_root_info(A, 4, **kw)
    assert info0["fallbacks"] == 1 and info0["method"][()] == "eigh" and info0["retries"][()] == 0
    root, info = inverse_pth_root_info(A, 4, ridge_retries=8, **kw)
    i = int(info["retries"][()])
    assert i >= 1 and info["fallbacks"] == 0 and info["method"][()] == "newton" and info["error"][()] <= 1e-3
    # the root is the one of the escalated ridge ε·10^i (Newton accuracy: error / p)
    exact = inverse_pth_root(A, 4, ridge_epsilon=1e-14 * 10.0 ** i)
    np.testing.assert_allclose(root, exact, atol=1e-3 * np.abs(exact).max())
    _, info1 = inverse_pth_root_info(A, 4, ridge_retries=i - 1, **kw)
    assert info1["fallbacks"] == 1  # not enough retries: eigh at ε
    with pytest.raises(ValueError, match="ridge_retries"):
        inverse_pth_root_info(A, 4, ridge_retries=-1, **kw)


@pytest.mark.parametrize("relative", [True, False])
def test_array_api_eigh_root_equals_the_host_root(relative):
    """R9: ``eigh_inverse_pth_root`` (array-API code, what a traced Shampoo step uses), batched."""
    from arrayopt.linalg.roots import eigh_inverse_pth_root

    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 5, 4))
    A = np.concatenate([x @ np.swapaxes(x, -1, -2), np.zeros((1, 5, 5))])
    want = np.stack([inverse_pth_root(a, 4, ridge_epsilon=1e-3, relative=relative) if a.any() or not relative
                     else np.eye(5) for a in A])
    namespaces = [np]
    if have("jax"):
        import jax.numpy as jnp

        namespaces.append(jnp)
    for xp in namespaces:
        root, ok = eigh_inverse_pth_root(xp, xp.asarray(A), 4, 1e-3, relative)
        assert np.asarray(ok).tolist() == [True] * 4
        np.testing.assert_allclose(np.asarray(root), want, rtol=1e-9, atol=1e-9, err_msg=str(xp))
