"""Shampoo's block groups: one plan per tree, batched work equal to the per-block math."""

from __future__ import annotations

import numpy as np

import arrayopt as ao
from arrayopt.linalg.roots import host_inverse_pth_roots, power_iteration
from arrayopt.shampoo import batched, math as smath


def test_tree_plan_groups_equal_blocks_once_per_tree():
    opt = ao.shampoo(learning_rate=0.1, block_size=4)
    params = {"a": np.ones((8, 4), np.float32), "b": np.ones((4, 4), np.float32), "c": np.ones(3, np.float32)}
    state = opt.init(params)
    plans = [opt.plan(p.shape) for p in params.values()]
    tp = opt.tree_plan(plans)
    assert tp is opt.tree_plan([opt.plan(p.shape) for p in params.values()])  # cached, not rebuilt
    sizes = sorted((g.shape, len(g.members)) for g in tp.groups)
    assert sizes == [((3,), 1), ((4, 4), 3)]  # a's two blocks and b share one group
    params, state = opt.step(params, {k: v * 0.5 for k, v in params.items()}, state)
    assert state["count"] == 1


def test_batched_products_equal_the_per_block_math():
    rng = np.random.default_rng(0)
    for shape, mask in [((5, 4), (True, True)), ((3, 4, 2), (True, True, True)), ((5, 4), (True, False)),
                        ((6,), (True,))]:
        gs = [rng.standard_normal(shape) for _ in range(3)]
        roots = [[np.linalg.qr(rng.standard_normal((d, d)))[0] for d, m in zip(shape, mask) if m] for _ in gs]
        g = batched.stack(np, gs)
        st = [batched.stack(np, [r[j] for r in roots]) for j in range(len(roots[0]))]
        got = batched.precondition(np, g, st, mask)
        rot = batched.rotate(np, g, st, mask)
        back = batched.rotate(np, g, st, mask, back=True)
        fac = batched.update_factors(np, [np.zeros_like(s) for s in st], g, mask, 0.9)
        for k in range(3):
            np.testing.assert_allclose(got[k], smath.precondition_block(np, gs[k], roots[k], mask), rtol=1e-12)
            np.testing.assert_allclose(rot[k], smath.rotate_block(np, gs[k], roots[k], mask), rtol=1e-12)
            np.testing.assert_allclose(back[k], smath.rotate_block(np, gs[k], roots[k], mask, back=True), rtol=1e-12)
            want = smath.update_factors(np, [np.zeros_like(s[k]) for s in st], gs[k], mask, 0.9)
            for a, b in zip(fac, want):
                np.testing.assert_allclose(a[k], b, rtol=1e-12)


def test_power_iteration_of_a_batch_equals_each_matrix_alone():
    rng = np.random.default_rng(1)
    mats = []
    for scale in (1.0, 50.0, 1e-3):  # different convergence speeds
        x = rng.standard_normal((6, 6)) * scale
        mats.append(x @ x.T + np.diag(np.arange(6.0)))
    batch = power_iteration(np.stack(mats))
    for k, m in enumerate(mats):
        assert batch[k] == power_iteration(m)


def test_host_roots_batched_by_shape_equal_one_at_a_time():
    rng = np.random.default_rng(2)
    mats = []
    for d in (4, 4, 3, 4):
        x = rng.standard_normal((d, d + 2))
        mats.append(x @ x.T)
    for method in ("eigh", "newton"):
        together, ok, _ = host_inverse_pth_roots(mats, [4, 4, 4, 2], ridge_epsilon=1e-6, method=method)
        for m, p, r in zip(mats, [4, 4, 4, 2], together):
            alone, _, _ = host_inverse_pth_roots([m], [p], ridge_epsilon=1e-6, method=method)
            np.testing.assert_allclose(r, alone[0], rtol=1e-12, atol=1e-14)
        assert all(ok)
