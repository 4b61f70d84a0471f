"""Eigenvalue-corrected Shampoo and warm-started QR eigenbases (``docs/shampoo.md`` Q1–Q6)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arrayopt as ao
from arrayopt.shampoo import eigenbasis
from arrayopt.shampoo.eigenbasis import off_diagonal_ratio, refresh_eigenbasis
from arrayopt.shampoo.math import rotate_block

EC = dict(preconditioner="eigenvalue_corrected", b1=0.0, graft="none")


def run(opt_kw, grads, shape, lr=1.0, state=None):
    """Per-step directions ``-u`` of Shampoo on one leaf (lr 1), and the final state."""
    opt = ao.shampoo(learning_rate=lr, **{"merge_small_dims": 1, **opt_kw})
    p = {"w": np.zeros(shape)}
    s = opt.init(p) if state is None else state
    out = []
    for g in grads:
        u, s = opt.update({"w": g}, s, p)
        out.append(-u["w"])
    return out, s


def grads_for(shape, k, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(k)]


def eigh_desc(a):
    w, q = np.linalg.eigh(0.5 * (a + a.T))
    return q[:, ::-1]


def mode_gram(g, j):
    m = np.moveaxis(g, j, 0).reshape(g.shape[j], -1)
    return m @ m.T


def rotate(g, qs, back=False):
    """Dense ``G ×_j Q_jᵀ`` (or ``×_j Q_j``) by einsum, mode by mode."""
    for j, q in enumerate(qs):
        g = np.moveaxis(np.tensordot(q if back else q.T, g, axes=([1], [j])), 0, j)
    return g


@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2), (6,)])
def test_eigh_refresh_every_step_equals_dense_computation(shape):
    """Q1: with exact eigh every step, each step is: factors, eigenbases, rotate, Adam moment, rotate back."""
    b2, eps, k = 0.9, 1e-8, 3
    gs = grads_for(shape, k, seed=len(shape))
    got, s = run(dict(EC, b2=b2, eps=eps, block_size=64, merge_small_dims=1), gs, shape)
    F = [np.zeros((d, d)) for d in shape]
    D = np.zeros(shape)
    for t, g in enumerate(gs, 1):
        F = [b2 * f + (1 - b2) * mode_gram(g, j) for j, f in enumerate(F)]
        qs = [eigh_desc(f) for f in F]
        gh = rotate(g, qs)
        D = b2 * D + (1 - b2) * gh ** 2
        want = rotate(gh / (np.sqrt(D / (1 - b2 ** t)) + eps), qs, back=True)
        np.testing.assert_allclose(got[t - 1], want, rtol=1e-7, atol=1e-9)
    assert s["root_jobs"] == k and s["root_failures"] == 0
    np.testing.assert_allclose(s["second_moment"][0][0], D, rtol=1e-9, atol=1e-12)


def test_blocks_are_independent_eigenvalue_corrected_problems():
    gs = grads_for((8, 4), 3, seed=3)
    kw = dict(EC, b2=0.95, eps=1e-8, merge_small_dims=1)
    whole, _ = run(dict(kw, block_size=4), gs, (8, 4))
    top, _ = run(dict(kw, block_size=64), [g[:4] for g in gs], (4, 4))
    bottom, _ = run(dict(kw, block_size=64), [g[4:] for g in gs], (4, 4))
    np.testing.assert_allclose(whole[-1], np.concatenate([top[-1], bottom[-1]]), rtol=1e-10, atol=1e-12)


def test_running_sum_with_frozen_basis_is_adagrad_in_the_rotated_coordinates():
    """Q2: β₂ = 1 and the basis of step 1 kept: D = Σ Ĝ², d = Q (Ĝ/(√D + ε)) Qᵀ, and D's row/column
    sums are the factors' diagonals in that basis, diag(Q_Lᵀ L Q_L) and diag(Q_Rᵀ R Q_R)."""
    shape, k, eps = (5, 3), 6, 1e-10
    gs = grads_for(shape, k, seed=7)
    got, s = run(dict(EC, b2=1.0, eps=eps, block_size=64, precondition_every=10 ** 6), gs, shape)
    qs = [eigh_desc(mode_gram(gs[0], j)) for j in range(2)]
    acc = np.zeros(shape)
    for t, g in enumerate(gs):
        gh = rotate(g, qs)
        acc += gh ** 2
        np.testing.assert_allclose(got[t], rotate(gh / (np.sqrt(acc) + eps), qs, back=True), rtol=1e-8, atol=1e-10)
    D = s["second_moment"][0][0]
    L, R = sum(g @ g.T for g in gs), sum(g.T @ g for g in gs)
    qL, qR = s["bases"][0][0]
    np.testing.assert_allclose(D.sum(axis=1), np.diagonal(qL.T @ L @ qL), rtol=1e-10)
    np.testing.assert_allclose(D.sum(axis=0), np.diagonal(qR.T @ R @ qR), rtol=1e-10)
    assert s["roots_step"] == 1 and s["root_jobs"] == 1


def spd(n, eigvals, seed):
    v, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return v @ np.diag(eigvals) @ v.T, v


@given(n=st.integers(2, 7), ratio=st.floats(0.1, 0.5), seed=st.integers(0, 10 ** 6))
@settings(max_examples=25, deadline=None)
def test_qr_refresh_converges_to_the_eigh_basis(n, ratio, seed):
    """Q3: from a random orthogonal start, QR iterations reach eigh's basis up to column signs."""
    lam = 3.0 * ratio ** np.arange(n)
    a, v = spd(n, lam, seed)
    q0, _ = np.linalg.qr(np.random.default_rng(seed + 1).standard_normal((n, n)))
    r = refresh_eigenbasis(a, q0, method="qr", iterations=400, tolerance=1e-13)
    assert r.status == "ok"
    np.testing.assert_allclose(np.abs(r.basis.T @ v), np.eye(n), atol=1e-6)
    np.testing.assert_allclose(r.eigenvalues, lam, rtol=1e-8)


@given(seed=st.integers(0, 10 ** 6), mult=st.sampled_from([(2, 1, 2), (1, 3), (3, 1, 1)]))
@settings(max_examples=10, deadline=None)
def test_qr_refresh_converges_to_eigh_subspaces_when_eigenvalues_repeat(seed, mult):
    lam = np.concatenate([np.full(m, 4.0 ** -i) for i, m in enumerate(mult)])
    n = lam.size
    a, v = spd(n, lam, seed)
    q0, _ = np.linalg.qr(np.random.default_rng(seed + 1).standard_normal((n, n)))
    r = refresh_eigenbasis(a, q0, method="qr", iterations=300, tolerance=1e-13)
    start = 0
    for m in mult:  # the projector onto each eigenspace is unique
        sl = slice(start, start + m)
        np.testing.assert_allclose(r.basis[:, sl] @ r.basis[:, sl].T, v[:, sl] @ v[:, sl].T, atol=1e-7)
        start += m


@given(n=st.integers(1, 8), seed=st.integers(0, 10 ** 6), cond=st.sampled_from([1.0, 1e3, 1e6]))
@settings(max_examples=15, deadline=None)
def test_cholesky_qr_equals_householder_qr_with_positive_diagonal(n, seed, cond):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = u @ np.diag(np.geomspace(1.0, 1.0 / cond, n)) @ v.T
    q, r = np.linalg.qr(w)
    want = q * np.where(np.diagonal(r) < 0, -1.0, 1.0)
    got = eigenbasis.orthonormalize(w)
    np.testing.assert_allclose(got.T @ got, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(got, want, atol=1e-9 * cond)
    # rank-deficient: Cholesky breaks down, Householder QR takes over
    w[:, 0] = 0.0
    got = eigenbasis.orthonormalize(w)
    np.testing.assert_allclose(got.T @ got, np.eye(n), atol=1e-12)


def test_blocked_cholesky_qr_is_the_qr_factorisation():
    """Above 64 columns the Cholesky factor and the triangular solve recurse on 2×2 blocks; the result
    is orthonormal and ``R = QᵀW`` is upper triangular with a positive diagonal (the unique QR)."""
    n = 300
    w = np.random.default_rng(n).standard_normal((n, n)) + 8.0 * np.eye(n)
    q = eigenbasis.orthonormalize(w)
    np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-12)
    r = q.T @ w
    assert np.abs(np.tril(r, -1)).max() < 1e-11 * np.abs(r).max() and (np.diagonal(r) > 0).all()


def test_skip_criterion_fires_on_diagonal_b_and_not_otherwise():
    """Q4: ‖B − diag(B)‖_F ≤ τ‖B‖_F with B = QᵀAQ keeps the basis; otherwise a QR step runs."""
    a = np.diag([5.0, 3.0, 1.0])
    r = refresh_eigenbasis(a, np.eye(3), method="qr", tolerance=0.01)
    assert r.status == "skipped" and r.perm is None
    np.testing.assert_array_equal(r.basis, np.eye(3))
    b, _ = spd(3, [5.0, 3.0, 1.0], 0)
    r = refresh_eigenbasis(b, np.eye(3), method="qr", tolerance=0.01)
    assert r.status == "ok" and off_diagonal_ratio(b) > 0.01
    assert not np.allclose(r.basis, np.eye(3))
    # at the threshold: the ratio of a nearly diagonal B against τ
    c = np.diag([5.0, 3.0, 1.0]) + 0.01 * (np.ones((3, 3)) - np.eye(3))
    ratio = off_diagonal_ratio(c)
    assert refresh_eigenbasis(c, np.eye(3), method="qr", tolerance=ratio * 1.01).status == "skipped"
    assert refresh_eigenbasis(c, np.eye(3), method="qr", tolerance=ratio * 0.99).status == "ok"
    # columns out of order are sorted by decreasing Rayleigh quotient first, and reported
    r = refresh_eigenbasis(np.diag([1.0, 5.0, 3.0]), np.eye(3), method="qr")
    assert r.status == "skipped" and list(r.perm) == [1, 2, 0]
    np.testing.assert_array_equal(r.eigenvalues, [5.0, 3.0, 1.0])


def test_optimizer_counts_skips_when_the_eigenbases_do_not_move():
    rng = np.random.default_rng(0)
    gs = [np.diag(rng.uniform(1, 2, 4)) for _ in range(5)]  # diagonal factors: B stays diagonal
    _, s = run(dict(EC, root_method="qr", block_size=64, b2=0.9), gs, (4, 4))
    assert s["refresh_skips"] == 2 * 4 and s["root_failures"] == 0  # the first refresh is eigh
    _, s = run(dict(EC, root_method="qr", block_size=64, b2=0.9), grads_for((4, 4), 5), (4, 4))
    assert s["refresh_skips"] < 2 * 4


def test_failed_refresh_keeps_the_basis_counts_and_never_reaches_the_weights(monkeypatch):
    gs = grads_for((4, 3), 4, seed=2)
    kw = dict(EC, root_method="qr", block_size=64, b2=0.9, qr_tolerance=0.0)

    def after_two_steps():
        return run(kw, gs[:2], (4, 3))[1]

    s0 = after_two_steps()
    before = [q.copy() for q in s0["bases"][0][0]]
    monkeypatch.setattr(eigenbasis, "orthonormalize", lambda m: np.full_like(m, np.nan))
    got, s = run(kw, gs[2:], (4, 3), state=s0)
    monkeypatch.undo()
    assert s["root_failures"] == 2 * 2 and s["root_jobs"] == 4
    for q_old, q_new in zip(before, s["bases"][0][0]):
        np.testing.assert_array_equal(q_old, q_new)
    # the same steps with no refresh at all (the basis of step 2 kept) give the same directions
    kept, _ = run(dict(kw, start_preconditioning_step=10 ** 6), gs[2:], (4, 3), state=after_two_steps())
    for a, b in zip(got, kept):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)


def test_root_inverse_from_qr_bases_approaches_the_eigh_roots():
    """Q5: roots Q diag((λ + ridge)^{-1/p}) Qᵀ from QR-refreshed bases; many iterations give eigh's roots,
    and the first refresh is exact eigh."""
    gs = grads_for((5, 4), 6, seed=4)
    kw = dict(b1=0.0, graft="none", block_size=64, b2=0.9, eps=1e-4)
    ref, _ = run(kw, gs, (5, 4))
    got, s = run(dict(kw, root_method="qr", qr_iterations=200, qr_tolerance=1e-12), gs, (5, 4))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-10)
    np.testing.assert_allclose(got[-1], ref[-1], rtol=1e-5, atol=1e-8)
    assert set(s) >= {"roots", "bases", "refresh_skips"}
    one, _ = run(dict(kw, root_method="qr"), gs, (5, 4))  # one warm iteration: close, not equal
    assert 0 < np.abs(one[-1] - ref[-1]).max() < 0.5 * np.abs(ref[-1]).max()


def test_state_bytes_are_exact():
    p = {"w": np.zeros((6, 3), np.float32), "v": np.zeros(3, np.float32)}
    n_param, n_fac = 6 * 3 + 3, 4 * 3 * 3 + 3 * 3  # w: two 3x3 blocks, two 3x3 factors each; v: one 3x3
    for kw, mats, extra in [(dict(), 2, 0), (dict(root_method="qr"), 3, 0),
                            (dict(preconditioner="eigenvalue_corrected"), 2, n_param),
                            (dict(preconditioner="eigenvalue_corrected", root_method="qr"), 2, n_param)]:
        s = ao.shampoo(block_size=3, merge_small_dims=1, **kw).init(p)
        # factors (+ roots and/or bases) + graft + momentum (+ second moment), float32
        assert ao.state_nbytes(s) == 4 * (mats * n_fac + 2 * n_param + extra), kw


def test_async_refreshes_equal_the_synchronous_run_bit_for_bit():
    gs = grads_for((6, 4), 7, seed=5)
    kw = dict(preconditioner="eigenvalue_corrected", root_method="qr", block_size=4, precondition_every=2,
              root_delay=1, b1=0.9)
    sync, _ = run(kw, gs, (6, 4), lr=0.1)
    with ThreadPoolExecutor(1) as pool:
        asyn, s = run(dict(kw, executor=pool), gs, (6, 4), lr=0.1)
    for a, b in zip(sync, asyn):
        np.testing.assert_array_equal(a, b)
    assert s["root_jobs"] == 4


class _ThreadComm:
    """Two ranks in one process (threads), for the distributed path."""

    def __init__(self, rank, box, barrier):
        self.rank, self.size, self.box, self.barrier = rank, 2, box, barrier

    def allgather(self, obj):
        self.box[self.rank] = obj
        self.barrier.wait()
        out = list(self.box)
        self.barrier.wait()
        return out


def test_refreshes_spread_over_two_ranks_equal_one_process():
    gs = grads_for((8, 6), 4, seed=6)
    kw = dict(preconditioner="eigenvalue_corrected", root_method="qr", block_size=4, b1=0.5)
    single, _ = run(kw, gs, (8, 6), lr=0.1)
    box, barrier, out = [None, None], threading.Barrier(2), [None, None]

    def rank(r):
        out[r] = run(dict(kw, comm=_ThreadComm(r, box, barrier)), gs, (8, 6), lr=0.1)[0]

    ts = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    for r in range(2):
        for a, b in zip(single, out[r]):
            np.testing.assert_array_equal(a, b)


def test_rotation_round_trips_with_unpreconditioned_axes():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((3, 4, 5))
    qs = [np.linalg.qr(rng.standard_normal((d, d)))[0] for d in (3, 5)]
    mask = (True, False, True)
    gh = rotate_block(np, g, qs, mask)
    np.testing.assert_allclose(gh, np.einsum("abc,ai,ck->ibk", g, qs[0], qs[1]), rtol=1e-12)
    np.testing.assert_allclose(rotate_block(np, gh, qs, mask, back=True), g, rtol=1e-10, atol=1e-12)
    g2 = rng.standard_normal((3, 5))  # one-sided matrices: a single product each way
    for mask, q, want in [((False, True), qs[1], g2 @ qs[1]), ((True, False), qs[0], qs[0].T @ g2)]:
        gh = rotate_block(np, g2, [q], mask)
        np.testing.assert_allclose(gh, want, rtol=1e-12)
        np.testing.assert_allclose(rotate_block(np, gh, [q], mask, back=True), g2, rtol=1e-10, atol=1e-12)


def test_heavyball_soap_parity_on_one_layer():
    """Q6: heavyball's SOAP with β₁ = 0, no weight decay, a basis frozen after its first (initialising)
    step, equals eigenvalue-corrected Shampoo with the same basis, β₂ = eigen_b2 and ε."""
    torch = pytest.importorskip("torch")
    heavyball = pytest.importorskip("heavyball", reason="heavyball is not installed")
    import heavyball.utils as hbu

    hbu.compile_mode = None
    n, beta, lr, eps = 6, 0.95, 0.1, 1e-8
    gs = grads_for((n, n), 6, seed=8)
    w0 = np.random.default_rng(9).standard_normal((n, n))
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = heavyball.SOAP([p], lr=lr, betas=(0.0, beta), shampoo_beta=beta, eps=eps, weight_decay=0.0,
                         precondition_frequency=10 ** 6)
    traj = []
    for g in gs:
        p.grad = torch.tensor(g)
        opt.step()
        traj.append(p.detach().numpy().copy())
    np.testing.assert_array_equal(traj[0], w0)  # SOAP's first step only initialises its eigenbases
    hb_q = [q.detach().numpy().reshape(n, n) for q in next(iter(opt.state[p].values()))["scale_by_soap_Q_3"]]
    ours = ao.shampoo(learning_rate=lr, preconditioner="eigenvalue_corrected", b1=0.0, graft="none", b2=beta,
                      eps=eps, block_size=64, merge_small_dims=1, start_preconditioning_step=10 ** 6)
    s = ours.init(w0.copy())
    qs = [eigh_desc(mode_gram(gs[0], j)) for j in range(2)]
    for q, h in zip(qs, hb_q):  # the same eigenbasis up to column signs and order
        np.testing.assert_allclose(np.sort(np.abs(q.T @ h), axis=1)[:, -1], 1.0, atol=1e-8)
    s["bases"] = [[qs]]
    s["roots_step"] = 1
    w = w0.copy()
    for t in range(1, len(gs)):
        w, s = ours.step(w, gs[t], s)
        np.testing.assert_allclose(w, traj[t], rtol=1e-6, atol=1e-6)


def test_cholesky_qr_skips_its_second_pass_only_when_the_first_is_orthonormal(monkeypatch):
    """One Cholesky QR pass when ``‖QᵀQ − I‖_F ≤ n u`` (a warm-started ``W = Q·(nearly diagonal)``): the
    result is CholeskyQR2's to a few rounding units; an ill-conditioned ``W`` takes both passes."""
    n, rng = 32, np.random.default_rng(11)
    calls = []
    chol = eigenbasis._cholesky
    monkeypatch.setattr(eigenbasis, "_cholesky", lambda g, *a: calls.append(1) or chol(g, *a))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = v @ (np.diag(np.geomspace(1.0, 1e-6, n)) + 1e-9 * rng.standard_normal((n, n)))
    q = eigenbasis.orthonormalize(w)
    assert len(calls) == 1
    two = eigenbasis._solve_right_lower_transposed(q, chol(q.T @ q))
    np.testing.assert_allclose(q, two, rtol=0, atol=8 * np.finfo(float).eps)
    calls.clear()
    w = v @ np.diag(np.geomspace(1.0, 1e-5, n)) @ np.linalg.qr(rng.standard_normal((n, n)))[0]
    q = eigenbasis.orthonormalize(w)
    assert len(calls) == 2
    np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-13)
