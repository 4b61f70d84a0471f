"""Trees are matched by key, as in JAX and Python: a grads mapping with the params' keys in
another order is the same tree; a real mismatch names the missing and extra keys; NamedTuples,
other mappings and JAX-registered dataclasses step and come back as the same class."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pytest

import arrayopt as ao
from _arrays import snapshot

NAMES = ["sgd", "adam", "adagrad", "sonew_tridiag", "shampoo", "sketchy", "eva_s"]


def _params(rng):
    return {"w": rng.normal(size=(6, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
            "blk": {"k": rng.normal(size=(3, 3)).astype(np.float32), "a": rng.normal(size=3).astype(np.float32)}}


def _reordered(tree):
    if isinstance(tree, dict):
        return {k: _reordered(tree[k]) for k in reversed(list(tree))}
    return tree


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fused", [True, False], ids=["step", "update"])
def test_grads_with_keys_in_another_order_give_the_same_result(name, fused):
    rng = np.random.default_rng(0)
    p0 = _params(rng)
    grads = [_params(rng) for _ in range(3)]
    opt = ao.registry.make(name)
    results = []
    for reorder in (False, True):
        p = {k: ({kk: vv.copy() for kk, vv in v.items()} if isinstance(v, dict) else v.copy())
             for k, v in p0.items()}
        s = opt.init(p)
        for g in grads:
            g = _reordered(g) if reorder else g
            if fused:
                p, s = opt.step(p, g, s)
            else:
                u, s = opt.update(g, s, p)
                assert list(u) == list(p), "updates come back in the params' key order"
                p = ao.apply_updates(p, u)
        assert list(p) == ["w", "b", "blk"] and list(p["blk"]) == ["k", "a"]
        results.append((snapshot(p), snapshot({k: v for k, v in s.items() if k != "consumed"})))
    assert results[0] == results[1]


def test_a_real_mismatch_names_the_missing_and_extra_keys():
    rng = np.random.default_rng(1)
    p = _params(rng)
    opt = ao.adam(0.1)
    s = opt.init(p)
    before = snapshot(p), snapshot(s)
    g = _params(rng)
    g["blk"] = {"k": g["blk"]["k"], "z": g["blk"]["a"]}
    with pytest.raises(ValueError, match=r"grads: tree structure differs from params at \['blk'\]: "
                                         r"missing keys \['a'\], extra keys \['z'\]"):
        opt.step(p, g, s)
    g = _params(rng)
    g["b"] = [g["b"]]
    with pytest.raises(ValueError, match=r"at \['b'\]: a list where params has an array"):
        opt.step(p, g, s)
    assert (snapshot(p), snapshot(s)) == before


class Layer(NamedTuple):
    w: np.ndarray
    b: np.ndarray


class FrozenMapping(Mapping):
    """A read-only mapping (like flax's FrozenDict)."""

    def __init__(self, d):
        self._d = dict(d)

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


def test_namedtuples_and_mappings_step_and_keep_their_class():
    rng = np.random.default_rng(2)

    def tree():
        return FrozenMapping({"l1": Layer(rng.normal(size=(4, 3)), rng.normal(size=3)),
                              "l2": Layer(rng.normal(size=(3, 2)), rng.normal(size=2))})

    p, g = tree(), tree()
    opt = ao.adam(0.1)
    s = opt.init(p)
    u, s2 = opt.update(g, s, p)
    assert isinstance(u, FrozenMapping) and isinstance(u["l1"], Layer)
    new = ao.apply_updates(p, u)
    assert isinstance(new, FrozenMapping) and isinstance(new["l2"], Layer)
    np.testing.assert_allclose(new["l1"].w, p["l1"].w - 0.1 * np.sign(g["l1"].w), rtol=1e-6)
    # a plain tuple where the params hold a NamedTuple is another structure
    bad = FrozenMapping({"l1": tuple(g["l1"]), "l2": g["l2"]})
    with pytest.raises(ValueError, match=r"at \['l1'\]: a tuple where params has a namedtuple Layer"):
        opt.update(bad, s2, new)


def test_jax_registered_dataclasses_are_trees():
    jax = pytest.importorskip("jax", reason="JAX-registered dataclasses need JAX")

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Dense:
        w: object
        b: object

    rng = np.random.default_rng(3)
    p = {"d": Dense(rng.normal(size=(3, 2)), rng.normal(size=2))}
    g = {"d": Dense(rng.normal(size=(3, 2)), rng.normal(size=2))}
    want = p["d"].w - 0.5 * g["d"].w
    opt = ao.sgd(0.5)
    s = opt.init(p)
    new, s = opt.step(p, g, s)
    assert isinstance(new["d"], Dense)
    np.testing.assert_allclose(new["d"].w, want, rtol=1e-12)
    assert s["param_paths"] == ("['d'][0]", "['d'][1]")


def _sorted_keys(tree):
    if isinstance(tree, dict):
        return {k: _sorted_keys(tree[k]) for k in sorted(tree)}
    return tree


@pytest.mark.parametrize("name", NAMES + ["chain", "partition"])
def test_params_with_keys_in_another_order_step_the_same_leaves(name):
    """``jax.tree_util.tree_map`` returns dicts with sorted keys: params rebuilt that way between
    steps still match their state, leaf by leaf, and results equal the run in init order."""
    rng = np.random.default_rng(4)
    p0 = _params(rng)
    grads = [_params(rng) for _ in range(3)]
    if name == "chain":
        opt = ao.chain(ao.clip_by_global_norm(1.0), ao.adam(0.1))
    elif name == "partition":
        opt = ao.partition(lambda p: {k: "a" if k == "w" else "b" for k in p}, {"a": ao.adam(0.1), "b": ao.sgd(0.1)})
    else:
        opt = ao.registry.make(name)
    results = []
    for resort in (False, True):
        p = {k: ({kk: vv.copy() for kk, vv in v.items()} if isinstance(v, dict) else v.copy())
             for k, v in p0.items()}
        s = opt.init(p)
        for g in grads:
            if resort:
                p, g = _sorted_keys(p), _sorted_keys(g)
            p, s = opt.step(p, g, s)
        results.append((snapshot({k: p[k] for k in ("w", "b", "blk")}),
                        snapshot({k: v for k, v in s.items() if k != "consumed"})))
    assert results[0] == results[1]
    assert list(p) == ["w", "b", "blk"]  # the state's order comes back


def test_params_that_are_not_a_reordering_still_name_the_leaf():
    opt = ao.adam(0.1)
    s = opt.init({"w": np.zeros(3), "b": np.zeros(2)})
    with pytest.raises(ValueError, match="the state was made by init"):
        opt.step({"w": np.zeros(3), "c": np.zeros(2)}, {"w": np.zeros(3), "c": np.zeros(2)}, s)
