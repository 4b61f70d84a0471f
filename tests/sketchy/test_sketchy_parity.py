"""Sketchy on every namespace and backend against the NumPy reference, on one fixed tree.

Sketchy's record sets ``namespace_sweep=False``: under the hypothesis sweep of
tests/test_parity.py every drawn shape compiles Sketchy's jitted axis update and
leaf update anew on JAX. Here every config and both float dtypes run on NumPy,
array-api-strict and torch (reference and auto backends) with one tree that
holds each kind of leaf: an order-3 tensor, a matrix with a dim above the rank,
a vector, a unit-dim matrix and a scalar. JAX, whose compilations dominate,
runs the config with every switch off its default on one matrix in float64
(its vector path runs in the generic save/load tests on JAX).
"""

from __future__ import annotations

import pytest

from _arrays import assert_trees_close, require
from records import RECORDS
from test_parity import CONTENDERS, _run

REC = next(r for r in RECORDS if r.name == "sketchy")
TREE = {"w": (5, 4, 3), "emb": (6, 2), "b": (3,), "head": (1, 4), "s": ()}
JAX_TREE = {"w": (4, 3)}
#: the RMSProp graft, rank 4 (covers the dim 3), ``update_every=3``, ``b2=1``, absolute ε, no Nesterov, a late start
JAX_CONFIG = 1
STEPS = 4  # with ``update_every=3`` the sketches change on steps 1 and 4 only


def _check(lib, config, tree, dtype):
    opt = REC.factory(**REC.configs[config])
    want_p, want_s = _run(opt, "numpy", "reference", tree, dtype, seed=config, steps=STEPS)
    rtol, atol = REC.rtol[dtype], REC.atol[dtype]
    for backend in ("auto", "reference"):
        if (lib, backend) not in CONTENDERS:
            continue
        got_p, got_s = _run(opt, lib, backend, tree, dtype, seed=config, steps=STEPS)
        assert_trees_close(got_p, want_p, rtol, atol, f"params {lib}/{backend}")
        assert_trees_close(got_s, want_s, rtol, atol, f"state {lib}/{backend}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("config", range(len(REC.configs)), ids=REC.ids())
@pytest.mark.parametrize("lib", ["numpy", "array_api_strict", "torch"])
def test_every_backend_and_namespace_matches_numpy_reference(lib, config, dtype):
    require(lib)
    _check(lib, config, TREE, dtype)


def test_jax_matches_numpy_reference():
    require("jax")
    assert REC.configs[JAX_CONFIG]["update_every"] == 3 and REC.configs[JAX_CONFIG]["rank"] >= max(JAX_TREE["w"])
    _check("jax", JAX_CONFIG, JAX_TREE, "float64")
