"""``ao.sketchy`` against its oracles (K9–K16 in docs/sketchy.md) and the regret bound of
S-AdaGrad (R9), all through the optimizer itself. The generic tests come from tests/records_sketchy.py."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arrayopt as ao
from arrayopt import grafting

sk = importlib.import_module("arrayopt.sketchy.optimizer")

PLAIN = dict(graft="none", b1=0.0, learning_rate=1.0)  # update = −direction


def _directions(opt, grads, shape):
    params = np.zeros(shape)
    state = opt.init(params)
    out = []
    for g in grads:
        u, state = opt.update(g, state, params)
        out.append(-u)
    return out, state


def _dense_root(M, p):
    w, q = np.linalg.eigh(M)
    inv = np.where(w > 1e-12 * w.max(), np.abs(w) ** (-1.0 / p), 0.0)
    return (q * inv) @ q.T


def test_reduces_to_shampoo_when_the_rank_covers_every_dim():
    """K9: rank ≥ dims, ε = 0, β₂ = 0.99: Sketchy = Shampoo (statistics weighted 1−β₂) ÷ √(1/(1−β₂))."""
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(4, 5)) for _ in range(6)]
    ours, _ = _directions(ao.sketchy(rank=5, b2=0.99, eps=0.0, merge_small_dims=1, **PLAIN), grads, (4, 5))
    theirs, _ = _directions(ao.shampoo(b2=0.99, eps=1e-12, block_size=8, **PLAIN), grads, (4, 5))
    for a, b in zip(ours[1:], theirs[1:]):  # step 1 has rank-deficient factors (pseudo-inverse vs ridge)
        np.testing.assert_allclose(a, b / 10.0, rtol=1e-6, atol=1e-9)


def test_s_adagrad_with_full_rank_is_full_matrix_adagrad():
    """K6: rank ≥ d ⇒ no tail, and the S-AdaGrad step is the full-matrix AdaGrad step (G_t^{1/2})⁺ g_t."""
    rng = np.random.default_rng(1)
    d = 7
    grads = [rng.normal(size=d) * np.arange(1, d + 1) ** -1.0 for _ in range(12)]
    ours, state = _directions(ao.sketchy(rank=d, b2=1.0, eps=0.0, **PLAIN), grads, (d,))
    G = np.zeros((d, d))
    for g, u in zip(grads, ours):
        G += np.outer(g, g)
        np.testing.assert_allclose(u, _dense_root(G, 2) @ g, rtol=1e-9, atol=1e-11)
    assert float(state["tail"][0][0][0]) == 0.0


@given(c=st.floats(1e-3, 1e3), relative=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=10, deadline=None)
def test_directions_are_scale_invariant(c, relative, seed):
    """K10: gradients × c > 0 leave S-AdaGrad and S-Shampoo directions unchanged (ε = 0 or relative)."""
    rng = np.random.default_rng(seed)
    for shape in [(9,), (6, 5)]:
        grads = [rng.normal(size=shape) for _ in range(5)]
        opt = ao.sketchy(rank=2, b2=0.9, eps=1e-4 if relative else 0.0, relative_eps=relative, merge_small_dims=1,
                         **PLAIN)
        a, _ = _directions(opt, grads, shape)
        b, _ = _directions(opt, [g * c for g in grads], shape)
        for x, y in zip(a, b):
            np.testing.assert_allclose(y, x, rtol=1e-8, atol=1e-12)


def test_mode_products_equal_one_einsum_in_any_axis_order():
    """K11: the cyclic mode products equal an einsum with the dense axis preconditioners."""
    rng = np.random.default_rng(2)
    shape = (4, 3, 5)
    grads = [rng.normal(size=shape) for _ in range(4)]
    (*_, last), state = _directions(ao.sketchy(rank=2, b2=0.9, merge_small_dims=1, **PLAIN), grads, shape)
    P = []
    for i in range(3):
        U, inv, inv_tail = (state[k][0][i] for k in ("eigvecs", "inv_eigvals", "inv_tail"))
        P.append((U * (inv - inv_tail)) @ U.T + inv_tail * np.eye(shape[i]))
    want = np.einsum("abc,ai,bj,ck->ijk", grads[-1], *P)
    np.testing.assert_allclose(last, want, rtol=1e-10, atol=1e-12)
    rev = np.einsum("abc,ck,bj,ai->ijk", grads[-1], P[2], P[1], P[0])
    np.testing.assert_allclose(rev, want, rtol=1e-10, atol=1e-12)


def test_grafting_norms_skipped_tensors_and_start_step():
    """K14: ‖step‖ = ‖RMSProp graft step‖ per tensor; a dim > 4096 or order < skip_preconditioning_rank_lt
    gets the graft step bit-identically; steps before start_preconditioning_step are graft steps."""
    rng = np.random.default_rng(3)
    shapes = {"w": (6, 5), "big": (4097,), "v": (7,)}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(4)]
    opt = ao.sketchy(learning_rate=1.0, b1=0.0, rank=2, merge_small_dims=1, skip_preconditioning_rank_lt=2,
                     start_preconditioning_step=3)
    params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    state = opt.init(params)
    acc = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    for t, g in enumerate(grads, start=1):
        u, state = opt.update(g, state, params)
        for k in shapes:
            a, acc[k] = grafting.direction(np, "rmsprop", g[k], acc[k], t, b2=0.999, eps=1e-8)
            if k != "w" or t < 3:
                np.testing.assert_array_equal(-u[k], a)
            else:
                np.testing.assert_allclose(np.linalg.norm(u[k]), np.linalg.norm(a), rtol=1e-6)
                assert not np.allclose(-u[k], a)
    zero, _ = _directions(ao.sketchy(rank=2, learning_rate=1.0, b1=0.0), [np.zeros(5)], (5,))
    assert not np.any(zero[0])


def test_update_every_changes_the_sketch_only_on_its_steps():
    """K15: update_every = f: the sketch takes steps t = 1, 1+f, …; every step preconditions."""
    rng = np.random.default_rng(4)
    opt = ao.sketchy(rank=2, update_every=3, merge_small_dims=1, **PLAIN)
    params = np.zeros((5, 4))
    state = opt.init(params)
    for t in range(1, 8):
        before = [np.array(a) for a in state["eigvecs"][0]]
        u, state = opt.update(rng.normal(size=(5, 4)), state, params)
        changed = any(not np.array_equal(a, b) for a, b in zip(before, state["eigvecs"][0]))
        assert changed == ((t - 1) % 3 == 0), t
        assert np.any(u)


def test_overflowing_sketch_update_keeps_the_sketch_and_is_counted():
    """K15: a finite gradient whose covariance overflows float32 leaves the sketch as it was."""
    opt = ao.sketchy(rank=2, learning_rate=1e-3, graft="sgd", merge_small_dims=1)
    params = np.zeros((4, 3), np.float32)
    state = opt.init(params)
    params, state = opt.step(params, np.ones((4, 3), np.float32), state)
    before = {k: [np.array(a) for a in state[k][0]] for k in sk.SKETCH_KEYS}
    params, state = opt.step(params, np.full((4, 3), 3e19, np.float32), state)
    assert state["sketch_skipped"] == 1 and state["count"] == 2
    for k in sk.SKETCH_KEYS:
        for a, b in zip(state[k][0], before[k]):
            np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(params))


def test_state_bytes_match_the_sketch_layout_and_undercut_adam():
    """K16: 4·(k(m+n) + 4k + 4) bytes of sketch per m×n float32 weight; (1024, 4096) with k = 256
    is below Adam's state with momentum alone (no graft accumulator), and its sketch is 1/6.5 of it."""
    m, n, k = 1024, 4096, 256
    params = {"w": np.zeros((m, n), np.float32)}
    full = ao.sketchy(rank=k).init(params)
    sketch_bytes = ao.state_nbytes({key: full[key] for key in sk.SKETCH_KEYS})
    assert sketch_bytes == 4 * (k * (m + n) + 4 * k + 4)
    adam = ao.state_nbytes(ao.adam().init(params))
    assert adam == 2 * 4 * m * n
    assert ao.state_nbytes(full) == sketch_bytes + 2 * 4 * m * n  # RMSProp graft and momentum
    assert ao.state_nbytes(ao.sketchy(rank=k, graft="sgd").init(params)) == sketch_bytes + 4 * m * n < adam
    assert ao.state_nbytes(ao.shampoo(block_size=4096).init(params)) > 8 * sketch_bytes


# ---------------------------------------------------------------- regret (R9)


def _least_squares_run(d, k, eta, T, decay, seed):
    """Online least squares f_t(x) = ½(a_tᵀx − b_t)², S-AdaGrad through ao.sketchy (β₂ = 1, ε = 0)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(T, d)) * np.arange(1, d + 1) ** (-decay)
    b = A @ rng.normal(size=d) + 0.3 * rng.normal(size=T)
    opt = ao.sketchy(rank=k, b2=1.0, eps=0.0, relative_eps=False, graft="none", b1=0.0, learning_rate=eta)
    x = np.zeros(d)
    state = opt.init(x)
    xs, gs, losses = [], [], []
    for a_t, b_t in zip(A, b):
        r = a_t @ x - b_t
        g = a_t * r
        xs.append(x.copy())
        gs.append(g)
        losses.append(0.5 * r * r)
        x, state = opt.step(x, g, state)
    x_star = np.linalg.lstsq(A, b, rcond=None)[0]
    regret = sum(losses) - 0.5 * np.sum((A @ x_star - b) ** 2)
    D = max(np.linalg.norm(xt - x_star) for xt in xs)
    G = sum(np.outer(g, g) for g in gs)
    U, sv, tail = state["eigvecs"][0][0], state["sv"][0][0], float(state["tail"][0][0][0])
    Gt = (U * sv ** 2) @ U.T + tail * np.eye(d)
    tr_half = lambda M: np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(M), 0, None)))  # noqa: E731
    lam = np.linalg.eigvalsh(G)[::-1]
    ell = k + 1
    omega = min(lam[j:].sum() / (ell - j) for j in range(ell))
    b1 = D * D / (2 * eta) * tr_half(Gt) + eta * tr_half(G)
    b2 = D * D / (2 * eta) * (tr_half(G) + np.sqrt(d * (d - ell) * tail)) + eta * tr_half(G)
    b3 = D * D / (2 * eta) * (tr_half(G) + d * np.sqrt(omega)) + eta * tr_half(G)
    return regret, b1, b2, b3, tail, omega


@given(d=st.integers(4, 14), k=st.integers(1, 6), eta=st.floats(0.05, 2.0), decay=st.floats(0.0, 1.5),
       seed=st.integers(0, 2**16))
@settings(max_examples=8, deadline=None)
def test_s_adagrad_regret_stays_under_its_bound(d, k, eta, decay, seed):
    """R9: realised regret ≤ (B1) ≤ (B1)+(B2) ≤ (B1)+(B2)+(B3), computed from the run (escaped mass ≤ Ω_ℓ)."""
    k = min(k, d - 2)
    if k < 1:
        k = 1
    regret, b1, b2, b3, tail, omega = _least_squares_run(d, k, eta, 150, decay, seed)
    slack = 1 + 1e-9
    assert tail <= omega * slack
    assert regret <= b1 * slack
    assert b1 <= b2 * slack
    assert b2 <= b3 * slack


def test_tail_decay_sqrt_reproduces_tearfree_sketchy():
    """With tail_decay="sqrt" (and tearfree's other defaults) the direction and the sketch state equal
    tearfree's ``sketchy.apply`` (Google's precondition checkout; skipped without it)."""
    import os
    import sys

    path = os.environ.get("PRECONDITION_PATH", "/tmp/precondition")
    if not os.path.isdir(os.path.join(path, "precondition", "tearfree")):
        pytest.skip(f"no google-research/precondition checkout at {path} (set PRECONDITION_PATH)")
    for mod in ("jax", "optax", "chex", "absl"):
        pytest.importorskip(mod, reason=f"tearfree needs {mod}")
    sys.path.insert(0, path)
    try:
        from precondition.tearfree import sketchy as tf_sketchy
    finally:
        sys.path.remove(path)
    import jax.numpy as jnp
    import jax

    with jax.enable_x64(False):  # tearfree's non-finite branch is float32
        _compare_with_tearfree(tf_sketchy, jnp)


def _compare_with_tearfree(tf_sketchy, jnp):
    rng = np.random.default_rng(6)
    shape, rank = (12, 7), 3
    tx = tf_sketchy.apply(tf_sketchy.Options(rank=rank, update_freq=2))
    tf_state = tx.init(jnp.zeros(shape, jnp.float32))
    opt = ao.sketchy(rank=rank, tail_decay="sqrt", update_every=2, merge_small_dims=1, **PLAIN)
    params = np.zeros(shape, np.float32)
    state = opt.init(params)
    for _ in range(5):
        g = rng.normal(size=shape).astype(np.float32)
        want, tf_state = tx.update(jnp.asarray(g), tf_state, None)
        u, state = opt.update(g, state, params)
        np.testing.assert_allclose(-u, np.asarray(want), rtol=2e-4, atol=2e-5 * np.abs(np.asarray(want)).max())
        for i, ax in enumerate(tf_state.sketches.axes):
            np.testing.assert_allclose(state["inv_eigvals"][0][i], np.asarray(ax.inv_eigvals), rtol=2e-4)
            np.testing.assert_allclose(state["tail"][0][i][0], float(ax.tail), rtol=2e-4)


def _trace_root(M, p):
    return float(np.sum(np.clip(np.linalg.eigvalsh(M), 0, None) ** (1.0 / p)))


@given(m=st.integers(3, 7), n=st.integers(3, 7), k=st.integers(1, 3), eta=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**16))
@settings(max_examples=6, deadline=None)
def test_s_shampoo_regret_stays_under_the_shampoo_form_bound(m, n, k, eta, seed):
    """R9, S-Shampoo form: online matrix least squares f_t(X) = ½‖X a_t − b_t‖² (rank-1 gradients,
    r = 1), β₂ = 1, ε = 0: Regret ≤ (D²/(2η)) tr L̃_T^{1/4} tr R̃_T^{1/4} + η r tr L_T^{1/4} tr R_T^{1/4},
    D = max_t ‖X_t − X*‖_F (H̃_t = L̃_t^{1/4} ⊗ R̃_t^{1/4} grows, H̃_t ⪰ (L_t ⊗ R_t)^{1/4} ⪰ r^{−1/2}(Σ g gᵀ)^{1/2})."""
    rng = np.random.default_rng(seed)
    T = 80
    A = rng.normal(size=(T, n)) * np.arange(1, n + 1) ** -0.7
    X_true = rng.normal(size=(m, n))
    B = A @ X_true.T + 0.3 * rng.normal(size=(T, m))
    opt = ao.sketchy(rank=k, b2=1.0, eps=0.0, relative_eps=False, graft="none", b1=0.0, learning_rate=eta,
                     merge_small_dims=1)
    X = np.zeros((m, n))
    state = opt.init(X)
    Xs, Gs, losses = [], [], []
    for a_t, b_t in zip(A, B):
        r = X @ a_t - b_t
        G = np.outer(r, a_t)
        Xs.append(X.copy())
        Gs.append(G)
        losses.append(0.5 * r @ r)
        X, state = opt.step(X, G, state)
    X_star = np.linalg.lstsq(A, B, rcond=None)[0].T
    regret = sum(losses) - 0.5 * np.sum((A @ X_star.T - B) ** 2)
    D = max(np.linalg.norm(x - X_star) for x in Xs)
    L, R = sum(G @ G.T for G in Gs), sum(G.T @ G for G in Gs)
    tilde = []
    for i in range(2):
        U, sv, tail = state["eigvecs"][0][i], state["sv"][0][i], float(state["tail"][0][i][0])
        tilde.append((U * sv ** 2) @ U.T + tail * np.eye(U.shape[0]))
    bound = D * D / (2 * eta) * _trace_root(tilde[0], 4) * _trace_root(tilde[1], 4) \
        + eta * _trace_root(L, 4) * _trace_root(R, 4)
    assert regret <= bound * (1 + 1e-9)
