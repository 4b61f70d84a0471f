"""Shampoo oracles (``docs/shampoo.md``): Kronecker identity, blocking, grafting, exponents, merging,
statistics, cadence, save/load."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arrayopt as ao
from _arrays import snapshot
from arrayopt.linalg import inverse_pth_root
from arrayopt.shampoo import GraftingConfig, ShampooConfig, merge_small_dims
from arrayopt.shampoo.blocking import block_slices, merge, split


def direction(opt_kw, grads, shape):
    """Shampoo's preconditioned direction at the last step (graft none, no momentum, lr 1)."""
    opt = ao.shampoo(learning_rate=1.0, b1=0.0, graft="none", **opt_kw)
    p = {"w": np.zeros(shape)}
    s = opt.init(p)
    for g in grads:
        u, s = opt.update({"w": g}, s, p)
    return -u["w"], s


def grads_for(shape, k, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(k)]


@given(m=st.integers(1, 6), n=st.integers(1, 6), k=st.integers(1, 4), b2=st.sampled_from([1.0, 0.9]),
       seed=st.integers(0, 100))
@settings(max_examples=20)
def test_kronecker_identity_against_dense_preconditioner(m, n, k, b2, seed):
    gs = grads_for((m, n), k, seed)
    d, _ = direction(dict(block_size=64, b2=b2, eps=1e-4, merge_small_dims=1), gs, (m, n))
    w = (lambda i: 1.0 if b2 == 1.0 else b2 ** (k - 1 - i) * (1 - b2))
    L = sum(w(i) * g @ g.T for i, g in enumerate(gs))
    R = sum(w(i) * g.T @ g for i, g in enumerate(gs))
    p = 4
    if m == 1 or n == 1:  # merged to a vector: full-matrix AdaGrad (exponent 1/2)
        v = gs[-1].reshape(-1)
        F = L if n == 1 else R
        want = inverse_pth_root(F, 2, ridge_epsilon=1e-4) @ v
        np.testing.assert_allclose(d.reshape(-1), want, rtol=1e-8, atol=1e-10)
        return
    dense = np.kron(inverse_pth_root(L, p, ridge_epsilon=1e-4), inverse_pth_root(R, p, ridge_epsilon=1e-4))
    np.testing.assert_allclose(d.reshape(-1), dense @ gs[-1].reshape(-1), rtol=1e-8, atol=1e-10)


def test_order3_mode_products_equal_einsum_and_any_order():
    gs = grads_for((3, 4, 5), 3)
    d, s = direction(dict(block_size=64, b2=1.0, eps=1e-3, merge_small_dims=1), gs, (3, 4, 5))
    Fs = [sum(np.tensordot(g, g, axes=([a for a in range(3) if a != j],) * 2) for g in gs) for j in range(3)]
    Rs = [inverse_pth_root(F, 6, ridge_epsilon=1e-3) for F in Fs]
    want = np.einsum("abc,ai,bj,ck->ijk", gs[-1], *Rs)
    np.testing.assert_allclose(d, want, rtol=1e-8, atol=1e-12)
    other = np.einsum("ck,abc,bj,ai->ijk", Rs[2], gs[-1], Rs[1], Rs[0])
    np.testing.assert_allclose(other, want, rtol=1e-12)


def test_vector_is_full_matrix_adagrad_and_rmsprop():
    gs = grads_for((7,), 4)
    for b2 in (1.0, 0.8):
        d, _ = direction(dict(block_size=64, b2=b2, eps=1e-6), gs, (7,))
        w = [1.0 if b2 == 1 else b2 ** (3 - i) * (1 - b2) for i in range(4)]
        H = sum(wi * np.outer(g, g) for wi, g in zip(w, gs))
        np.testing.assert_allclose(d, inverse_pth_root(H, 2, ridge_epsilon=1e-6) @ gs[-1], rtol=1e-8)


def test_rank_one_gradient_gives_normalized_gradient():
    rng = np.random.default_rng(0)
    g = np.outer(rng.standard_normal(5), rng.standard_normal(4))
    d, _ = direction(dict(block_size=64, b2=1.0, eps=1e-12), [g], (5, 4))
    np.testing.assert_allclose(d, g / np.linalg.norm(g), rtol=1e-4, atol=1e-6)


def test_scale_invariance():
    gs = grads_for((6, 5), 3)
    d1, _ = direction(dict(block_size=64, eps=1e-6), gs, (6, 5))
    d2, _ = direction(dict(block_size=64, eps=1e-6), [g * 37.0 for g in gs], (6, 5))
    np.testing.assert_allclose(d1, d2, rtol=1e-7, atol=1e-12)


@given(m=st.integers(1, 9), n=st.integers(1, 9), b=st.integers(1, 5), seed=st.integers(0, 50))
@settings(max_examples=20)
def test_blocking_equals_independent_shampoo_per_block(m, n, b, seed):
    gs = grads_for((m, n), 3, seed)
    kw = dict(block_size=b, eps=1e-5, merge_small_dims=1, skip_preconditioning_dim_size_gt=None)
    d, _ = direction(kw, gs, (m, n))
    for blk in block_slices((m, n), b):
        if any(z - a == 1 for a, z in blk):
            continue  # a block with a size-1 axis keeps its 1x1 factor; as its own param it would be a vector
        sl = tuple(slice(a, z) for a, z in blk)
        db, _ = direction(dict(kw, block_size=64), [g[sl] for g in gs], tuple(z - a for a, z in blk))
        np.testing.assert_allclose(d[sl], db, rtol=1e-8, atol=1e-12)
    # (a) block size >= all dims: identical to unblocked
    d_big, _ = direction(dict(kw, block_size=max(m, n)), gs, (m, n))
    d_huge, _ = direction(dict(kw, block_size=1000), gs, (m, n))
    np.testing.assert_array_equal(d_big, d_huge)


@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple), b=st.integers(1, 4))
@settings(max_examples=30)
def test_block_split_merge_round_trip(shape, b):
    x = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    blocks = block_slices(shape, b)
    parts = split(np, x, blocks)
    assert blocks[0] == tuple((0, min(b, d)) for d in shape)  # first axis outermost
    np.testing.assert_array_equal(merge(np, parts, shape, b), x)


def test_merge_small_dims_tables():
    assert merge_small_dims([1, 2, 512, 1, 2048, 1, 3, 4], 1024) == (1024, 2048, 12)
    assert merge_small_dims([1, 2, 768, 1, 2048], 1024) == (2, 768, 2048)
    assert merge_small_dims([1, 1, 1], 8) == (1,)
    assert merge_small_dims([], 8) == (1,)
    assert merge_small_dims([3, 3, 128, 128], 128) == (9, 128, 128)


def test_exponent_conventions():
    opt = ao.shampoo(block_size=64, merge_small_dims=1)
    assert opt.plan((3, 4, 5)).exponent == 6 and opt.plan((3, 4)).exponent == 4 and opt.plan((5,)).exponent == 2
    assert ao.shampoo(block_size=64, exponent_override=4).plan((7,)).exponent == 4
    one = ao.shampoo(block_size=64, preconditioner_type="input", merge_small_dims=1)
    assert one.plan((3, 4)).mask == (True, False) and one.plan((3, 4)).exponent == 2
    out = ao.shampoo(block_size=64, preconditioner_type="output", merge_small_dims=1)
    assert out.plan((3, 4)).mask == (False, True) and out.plan((3, 4)).exponent == 2
    # one-sided direction: L^{-1/2} G (the unpreconditioned axis is rotated only)
    gs = grads_for((4, 3), 2)
    d, _ = direction(dict(block_size=64, b2=1.0, preconditioner_type="input", merge_small_dims=1), gs, (4, 3))
    L = sum(g @ g.T for g in gs)
    np.testing.assert_allclose(d, inverse_pth_root(L, 2) @ gs[-1], rtol=1e-8)
    d, _ = direction(dict(block_size=64, b2=1.0, preconditioner_type="output", merge_small_dims=1), gs, (4, 3))
    R = sum(g.T @ g for g in gs)
    np.testing.assert_allclose(d, gs[-1] @ inverse_pth_root(R, 2), rtol=1e-8)
    # skip rules: scalars and too-large dims use the grafting direction
    assert ao.shampoo().plan(()).skipped and ao.shampoo(skip_preconditioning_dim_size_gt=10).plan((11, 2)).skipped


@pytest.mark.parametrize("graft", ["sgd", "adagrad", "rmsprop", "rmsprop_normalized", "adam", "sqrt_n"])
def test_grafting_norm_equals_grafted_step_norm(graft):
    rng = np.random.default_rng(0)
    shapes = {"w": (9, 6), "b": (6,), "s": ()}
    gs = [{k: rng.standard_normal(v) for k, v in shapes.items()} for _ in range(3)]
    opt = ao.shampoo(learning_rate=1.0, b1=0.0, graft=graft, block_size=4)
    gr = ao.shampoo(learning_rate=1.0, b1=0.0, graft=graft, block_size=4, start_preconditioning_step=10 ** 6)
    p = {k: np.zeros(v) for k, v in shapes.items()}
    s1, s2 = opt.init(p), gr.init(p)
    for g in gs:
        u1, s1 = opt.update(g, s1, p)
        u2, s2 = gr.update(g, s2, p)
        for k in shapes:
            assert np.isclose(np.linalg.norm(u1[k]), np.linalg.norm(u2[k]), rtol=1e-6), k
        assert not np.allclose(u1["w"], u2["w"])  # but the direction is Shampoo's
        np.testing.assert_array_equal(u1["s"], u2["s"])  # scalars: grafting only


def test_pure_grafting_equals_first_order_methods():
    rng = np.random.default_rng(1)
    gs = [rng.standard_normal((4, 3)) for _ in range(5)]
    never = 10 ** 9

    def run(opt):
        p = {"w": np.ones((4, 3))}
        s = opt.init(p)
        for g in gs:
            p, s = opt.step(p, {"w": g}, s)
        return p["w"]

    np.testing.assert_allclose(
        run(ao.shampoo(0.1, graft="adagrad", graft_eps=1e-10, b1=0.0, start_preconditioning_step=never)),
        run(ao.adagrad(0.1, eps=1e-10)), rtol=1e-12)
    np.testing.assert_allclose(
        run(ao.shampoo(0.1, graft="sgd", b1=0.9, nesterov=True, start_preconditioning_step=never)),
        run(ao.sgd(0.1, momentum=0.9, nesterov=True)), rtol=1e-12)
    # decoupled weight decay: θ ← θ - η (m + λ θ) with heavy-ball m
    p, m = np.ones((4, 3)), np.zeros((4, 3))
    for g in gs:
        m = 0.9 * m + g
        p = p - 0.1 * (m + 0.01 * p)
    np.testing.assert_allclose(
        run(ao.shampoo(0.1, graft="sgd", b1=0.9, nesterov=False, weight_decay=0.01, start_preconditioning_step=never)),
        p, rtol=1e-12)


def test_statistics_algebra_and_root_cadence():
    gs = grads_for((4, 3), 7)
    opt = ao.shampoo(block_size=64, b2=1.0, precondition_every=3, start_preconditioning_step=2, merge_small_dims=1)
    p = {"w": np.zeros((4, 3))}
    s = opt.init(p)
    roots_at = []
    for i, g in enumerate(gs, start=1):
        before = snapshot(s["roots"])
        _, s = opt.update({"w": g}, s, p)
        if snapshot(s["roots"]) != before:
            roots_at.append(i)
        np.testing.assert_allclose(s["stats"][0][0][0], sum(x @ x.T for x in gs[:i]), rtol=1e-12)
        assert s["roots_step"] == max([r for r in roots_at] or [0])
    assert roots_at == [2, 5] and s["root_jobs"] == 2 and s["root_staleness"] == 2


@pytest.mark.parametrize("b2", [1.0, 0.9])
def test_statistics_untouched_between_statistics_steps(b2):
    """Oracle 14 (statistics_compute_steps): factors take only the gradients of steps t % k == 0."""
    gs = grads_for((4, 3), 7)
    opt = ao.shampoo(block_size=64, b2=b2, statistics_every=3, merge_small_dims=1)
    p = {"w": np.zeros((4, 3))}
    s = opt.init(p)
    left = np.zeros((4, 4))
    for i, g in enumerate(gs, start=1):
        before = np.array(s["stats"][0][0][0], copy=True)
        _, s = opt.update({"w": g}, s, p)
        after = s["stats"][0][0][0]
        if i % 3:
            np.testing.assert_array_equal(after, before)
        else:
            left = left + g @ g.T if b2 == 1.0 else b2 * left + (1 - b2) * (g @ g.T)
            np.testing.assert_allclose(after, left, rtol=1e-12)
    with pytest.raises(ValueError, match="statistics_every"):
        ao.shampoo(statistics_every=0)


def test_start_step_switch_uses_grafting_before():
    gs = grads_for((4, 3), 4)
    kw = dict(learning_rate=1.0, b1=0.0, block_size=64, graft="adagrad", start_preconditioning_step=3)
    opt, gr = ao.shampoo(**kw), ao.shampoo(**dict(kw, start_preconditioning_step=99))
    p = {"w": np.zeros((4, 3))}
    s1, s2 = opt.init(p), gr.init(p)
    for i, g in enumerate(gs, start=1):
        u1, s1 = opt.update({"w": g}, s1, p)
        u2, s2 = gr.update({"w": g}, s2, p)
        assert np.array_equal(u1["w"], u2["w"]) == (i < 3)


def test_failed_roots_keep_previous_and_are_counted(monkeypatch):
    from arrayopt.linalg import roots as roots_mod

    opt = ao.shampoo(block_size=64, merge_small_dims=1)
    p = {"w": np.zeros((4, 3))}
    s = opt.init(p)
    gs = grads_for((4, 3), 3)
    _, s = opt.update({"w": gs[0]}, s, p)
    kept = snapshot(s["roots"])

    def broken(a, *args, **kw):
        raise np.linalg.LinAlgError("forced")

    monkeypatch.setattr(roots_mod.np.linalg, "eigh", broken)
    u, s = opt.update({"w": gs[1]}, s, p)
    assert snapshot(s["roots"]) == kept and s["root_failures"] == 2
    assert np.all(np.isfinite(u["w"]))


def test_config_is_frozen_and_validated():
    cfg = ShampooConfig(learning_rate=0.1, block_size=8)
    with pytest.raises(Exception):
        cfg.block_size = 4
    with pytest.raises(ValueError, match="graft: must be one of"):
        GraftingConfig("lion")
    with pytest.raises(ValueError, match="graft_b2: must be < 1"):
        GraftingConfig("adam", b2=1.0)
    opt = ao.shampoo(graft=GraftingConfig("rmsprop", b2=0.9, eps=1e-6))
    assert opt.config.graft.b2 == 0.9


def test_state_bytes_and_float32_roots_for_bf16():
    torch = pytest.importorskip("torch", reason="bfloat16 params")
    opt = ao.shampoo(block_size=4)
    p = {"w": torch.randn(6, 5, dtype=torch.bfloat16)}
    s = opt.init(p)
    p, s = opt.step(p, {"w": torch.randn(6, 5, dtype=torch.bfloat16)}, s)
    assert s["roots"][0][0][0].dtype == torch.float32
    # 4 blocks (4x4, 4x1, 2x4, 2x1) -> factors 4,4,4,1,2,4,2,1 ; stats+roots + graft + momentum
    n_fac = 16 + 16 + 16 + 1 + 4 + 16 + 4 + 1
    assert ao.state_nbytes(s) == 4 * (2 * n_fac + 2 * 30)


def test_ridge_retries_reach_the_root_job_and_are_validated(monkeypatch):
    import importlib

    ar = importlib.import_module("arrayopt.shampoo.async_roots")

    seen = []
    real = ar.host_inverse_pth_roots

    def spy(*a, **kw):
        seen.append(kw["ridge_retries"])
        return real(*a, **kw)

    monkeypatch.setattr(ar, "host_inverse_pth_roots", spy)
    opt = ao.shampoo(block_size=64, root_method="newton", ridge_retries=3, merge_small_dims=1)
    p = {"w": np.zeros((4, 3))}
    opt.update({"w": np.ones((4, 3))}, opt.init(p), p)
    assert seen == [3]
    with pytest.raises(ValueError, match="ridge_retries"):
        ao.shampoo(ridge_retries=-1)
