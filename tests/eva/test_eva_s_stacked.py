"""Eva-s on stacks of same-shaped leaves equals the per-tensor formula (E4) with SGD-norm grafting."""

import numpy as np
import pytest

import arrayopt as ao
from _arrays import step_tree_and_each_leaf_alone
from arrayopt import grafting
from arrayopt.eva.math import axis_means, eva_s_graft_stacked, eva_s_precondition

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2), (3, 2, 2, 5)])
def test_axis_means_are_the_means_over_the_other_axes(shape):
    G = np.random.default_rng(0).normal(size=(3,) + shape)
    for i, m in enumerate(axis_means(np, G)):
        want = np.mean(G, axis=tuple(a for a in range(1, len(shape) + 1) if a != i + 1))
        np.testing.assert_allclose(m, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 2, 5)])
def test_stacked_direction_equals_each_tensor_alone(dtype, shape):
    rng = np.random.default_rng(1)
    G = rng.normal(size=(4,) + shape).astype(dtype)
    G[3] = 0.0  # the zero guard: a zero direction stays zero
    s = [rng.normal(size=(4, d)).astype(dtype) for d in shape]
    got = eva_s_graft_stacked(G, s, 0.03)
    for b in range(4):
        want = grafting.graft(np, eva_s_precondition(G[b], [v[b] for v in s], 0.03), G[b])
        assert _rel(got[b], want) <= TOL[dtype] or (np.all(got[b] == 0) and np.all(want == 0))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_tree_of_same_shaped_leaves_steps_as_each_leaf_alone(dtype):
    shapes = [(6, 4), (6, 4), (5,), (6, 4), (3, 2, 2), (3, 2, 2)]
    params, alone = step_tree_and_each_leaf_alone(ao.eva(learning_rate=0.1, variant="eva_s"), shapes, dtype, seed=2)
    for k in params:
        assert _rel(params[k], alone[k]) <= TOL[dtype], k
