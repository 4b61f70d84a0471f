"""Stacked (grouped) Sketchy work equals the per-leaf results: fd_update_stacked against fd_update,
and a tree of same-shaped leaves stepped together against each leaf stepped alone."""

import numpy as np
import pytest

import arrayopt as ao
from _arrays import step_tree_and_each_leaf_alone
from arrayopt.sketchy.math import fd_update, fd_update_stacked

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("d,k,m", [(6, 3, 1), (5, 5, 4), (8, 2, 12)])
def test_fd_update_stacked_equals_each_sketch_alone(dtype, d, k, m):
    rng = np.random.default_rng(0)
    B = 4
    singles = []
    for b in range(B):
        s = fd_update(np.zeros((d, k), dtype), np.zeros(k, dtype), np.zeros(1, dtype),
                      rng.normal(size=(d, m)).astype(dtype), beta2=0.9)
        singles.append((s.eigvecs, s.sv, s.tail))
    xs = rng.normal(size=(B, d, m)).astype(dtype)
    xs[2] = np.nan  # a non-finite item keeps its sketch and leaves the others alone
    got = fd_update_stacked(np.stack([u for u, _, _ in singles]), np.stack([s for _, s, _ in singles]),
                            np.stack([t for _, _, t in singles]), xs, beta2=0.9)
    for b, (u, sv, tail) in enumerate(singles):
        want = fd_update(u, sv, tail, xs[b], beta2=0.9)
        assert bool(got.ok[b]) == bool(want.ok)
        for name in ("eigvecs", "sv", "tail", "undeflated", "escaped"):
            g, w = getattr(got, name)[b], getattr(want, name)
            assert _rel(g, np.reshape(w, np.shape(g))) <= TOL[dtype], name


def test_fd_update_rejects_a_tail_of_several_entries():
    with pytest.raises(ValueError, match="tail"):
        fd_update(np.zeros((3, 2)), np.zeros(2), np.zeros(2), np.ones(3))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_tree_of_same_shaped_leaves_steps_as_each_leaf_alone(dtype):
    shapes = [(6, 4), (6, 4), (5,), (6, 4), (5,), (3, 2, 2)]
    params, alone = step_tree_and_each_leaf_alone(ao.sketchy(learning_rate=0.1, rank=3), shapes, dtype, seed=1)
    for k in params:
        assert _rel(params[k], alone[k]) <= TOL[dtype], k


def test_the_reference_update_of_a_grouped_tree_equals_each_leaf_alone():
    rng = np.random.default_rng(2)
    shapes = [(4, 3), (4, 3), (7,), (7,)]
    opt = ao.sketchy(learning_rate=0.1, rank=2)
    params = {f"p{i}": rng.normal(size=s) for i, s in enumerate(shapes)}
    grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
    updates, _ = opt.update(grads, opt.init(params), params)
    for k in params:
        one, _ = opt.update({k: grads[k]}, opt.init({k: params[k]}), {k: params[k]})
        assert _rel(updates[k], one[k]) <= 1e-12, k
