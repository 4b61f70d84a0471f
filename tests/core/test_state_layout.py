"""A step depends on the state's values only, not on its arrays' memory layout or allocation.

``load_state`` gives back fresh C-ordered arrays from the library's own allocator; a resumed
run is bit-identical only if the next step gives the same bits from such copies as from the
live state (whose arrays may be Fortran-ordered results of a decomposition, or views).
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao
from _arrays import asarray, require, snapshot, to_numpy, tree_map
from records import CASE_IDS, CASES


def _fresh_copy(x, order="C"):
    """What load_state makes of an array: a new one in C order (or ``order="F"``)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        if order == "C" or x.ndim < 2:
            return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)
        rev = tuple(range(x.ndim))[::-1]
        return torch.empty(tuple(reversed(x.shape)), dtype=x.dtype, device=x.device).copy_(x.permute(rev)).permute(rev)
    if isinstance(x, np.ndarray):
        return np.array(x, order=order, copy=True)
    return x


def _map(f, node):
    if isinstance(node, dict):
        return {k: _map(f, v) for k, v in node.items()}
    if isinstance(node, list):
        return [_map(f, v) for v in node]
    if isinstance(node, tuple):
        return tuple(_map(f, v) for v in node)
    return f(node)


def _run(rec, config, lib, dtype, steps=5):
    opt = rec.factory(**config)
    rng = np.random.default_rng(3)

    def tree():
        return {"layer": [asarray(lib, rng.normal(size=(4, 3)), dtype), asarray(lib, rng.normal(size=3), dtype)]}

    params = tree()
    state = opt.init(params)
    for _ in range(steps):
        params, state = opt.step(params, tree(), state)
    return opt, params, state, tree()


@pytest.mark.parametrize("rec,config", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("lib,dtype", [("numpy", "float32"), ("torch", "float32"), ("torch", "bfloat16")])
def test_step_from_fresh_c_ordered_copies_of_the_state_is_bit_identical(rec, config, lib, dtype):
    require(lib)
    opt, params, state, g = _run(rec, config, lib, dtype)
    copy = _map(_fresh_copy, state)
    p1, s1 = opt.step(tree_map(lambda x: asarray(lib, to_numpy(x), dtype), params), g, copy)
    p2, s2 = opt.step(tree_map(lambda x: asarray(lib, to_numpy(x), dtype), params), g, state)
    assert snapshot(p1) == snapshot(p2)
    assert snapshot(s1) == snapshot(s2)


@pytest.mark.parametrize("lib,dtype", [("numpy", "float32"), ("torch", "float32"), ("torch", "bfloat16")])
@pytest.mark.parametrize("config", [{"rank": 2}, {"rank": 4, "update_every": 2}])
def test_sketchy_step_is_the_same_for_c_and_fortran_ordered_eigvecs(lib, dtype, config):
    require(lib)
    from records import RECORDS

    rec = next(r for r in RECORDS if r.name == "sketchy")
    opt, params, state, g = _run(rec, {"learning_rate": 0.05, **config}, lib, dtype)
    results, copies = [], []
    for order in ("C", "F"):  # full copies first: a fused step reuses the buffers of the state it consumes
        copies.append(_map(_fresh_copy, state))
        copies[-1]["eigvecs"] = [[_fresh_copy(u, order) for u in leaf] for leaf in state["eigvecs"]]
    for st in copies:
        results.append(snapshot(opt.step(tree_map(lambda x: asarray(lib, to_numpy(x), dtype), params), g, st)))
    assert results[0] == results[1]
    live = opt.step(params, g, state)
    assert snapshot(live) == results[0]
    # the state the step returns keeps its eigenvectors in C order
    if lib == "torch":
        assert all(u.is_contiguous() for leaf in live[1]["eigvecs"] for u in leaf)
