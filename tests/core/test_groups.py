"""Per-parameter groups (``ao.partition``, ``ao.masked``): each group steps exactly as its optimizer alone.

The generic tests cover them through ``tests/records_groups.py``; these check the grouping itself.
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao
from _arrays import asarray, require, snapshot, to_numpy
import records  # noqa: F401  (collects records_groups; importing it first would be circular)
from records_groups import by_rank
from test_threads import _assert_same, _run, _threaded


def _tree(rng, lib="numpy"):
    return {"layers": [{"w": asarray(lib, rng.normal(size=(6, 5)), "float32"),
                        "b": asarray(lib, rng.normal(size=5), "float32")},
                       {"w": asarray(lib, rng.normal(size=(5, 3)), "float32"),
                        "b": asarray(lib, rng.normal(size=3), "float32")}],
            "scale": asarray(lib, rng.normal(size=()), "float32")}


@pytest.mark.parametrize("lib,call", [("numpy", "step"), ("numpy", "update"), ("torch", "step")])
def test_each_group_steps_bit_identically_to_its_optimizer_alone(lib, call):
    require(lib)
    rng = np.random.default_rng(0)
    params = _tree(rng, lib)
    sonew, adamw = ao.sonew(0.05, band=1, eps=1e-3), ao.adamw(0.05, weight_decay=0.0)
    opt = ao.partition(by_rank, {"matrix": sonew, "vector": adamw})
    state = opt.init(params)
    assert state["groups"] == (0, 1, 0, 1, 1)  # leaves in order: w, b, w, b, scale
    mats = [to_numpy(params["layers"][i]["w"]).copy() for i in range(2)]
    vecs = [to_numpy(params["layers"][i]["b"]).copy() for i in range(2)] + [to_numpy(params["scale"]).copy()]
    mats, vecs = [asarray(lib, m, "float32") for m in mats], [asarray(lib, v, "float32") for v in vecs]
    s_m, s_v = sonew.init(mats), adamw.init(vecs)
    for _ in range(3):
        g = _tree(rng, lib)
        g_m = [g["layers"][i]["w"] for i in range(2)]
        g_v = [g["layers"][0]["b"], g["layers"][1]["b"], g["scale"]]
        if call == "step":
            params, state = opt.step(params, g, state)
            mats, s_m = sonew.step(mats, g_m, s_m)
            vecs, s_v = adamw.step(vecs, g_v, s_v)
        else:
            u, state = opt.update(g, state, params)
            params = ao.apply_updates(params, u)
            u_m, s_m = sonew.update(g_m, s_m, mats)
            mats = ao.apply_updates(mats, u_m)
            u_v, s_v = adamw.update(g_v, s_v, vecs)
            vecs = ao.apply_updates(vecs, u_v)
    assert snapshot([params["layers"][0]["w"], params["layers"][1]["w"]]) == snapshot(mats)
    assert snapshot([params["layers"][0]["b"], params["layers"][1]["b"], params["scale"]]) == snapshot(vecs)
    assert state["count"] == 3 and state["inner"][0]["count"] == 3
    # the group states name the leaves by their paths in the full tree
    assert state["inner"][0]["param_paths"] == ("['layers'][0]['w']", "['layers'][1]['w']")


def test_labels_tree_single_label_and_unused_labels():
    params = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}
    g = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}
    opt = ao.partition({"w": "sgd", "b": "frozen"}, {"sgd": ao.sgd(0.5), "frozen": ao.scale(0.0),
                                                      "unused": ao.adam()})
    state = opt.init(params)
    assert state["inner"][2] is None
    params, state = opt.step(params, g, state)
    assert np.all(params["w"] == 0.5) and np.all(params["b"] == 1.0)
    whole = ao.partition("all", {"all": ao.sgd(0.5)})
    p, _ = whole.step({"w": np.ones(2, np.float32)}, {"w": np.ones(2, np.float32)},
                      whole.init({"w": np.ones(2, np.float32)}))
    assert np.all(p["w"] == 0.5)


def test_masked_passes_the_other_leaves_through():
    params = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}
    g = {"w": np.full((3, 2), 2.0, np.float32), "b": np.full(2, 2.0, np.float32)}
    opt = ao.masked(ao.scale(-0.25), {"w": True, "b": False})
    u, state = opt.update(g, opt.init(params))
    assert np.all(u["w"] == -0.5) and np.all(u["b"] == 2.0) and state["count"] == 1
    decay_w = ao.chain(ao.masked(ao.scale(0.5), lambda p: {"w": True, "b": False}), ao.sgd(1.0))
    p, _ = decay_w.step(params, g, decay_w.init(params))
    assert np.all(p["w"] == 0.0) and np.all(p["b"] == -1.0)


def test_bad_construction_and_labels_raise_named_errors():
    with pytest.raises(ValueError, match="transforms: expected a non-empty dict"):
        ao.partition(by_rank, {})
    with pytest.raises(TypeError, match=r"transforms\['matrix'\]: expected an arrayopt optimizer"):
        ao.partition(by_rank, {"matrix": "adam"})
    with pytest.raises(ValueError, match="labels: 'x' is neither a function"):
        ao.partition("x", {"a": ao.adam()})
    with pytest.raises(TypeError, match="opt: expected an arrayopt optimizer"):
        ao.masked(None, {"w": True})
    params = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match=r"labels leaf \['b'\]: label 'bias' is not a key of transforms"):
        ao.partition({"w": "matrix", "b": "bias"}, {"matrix": ao.adam()}).init(params)
    with pytest.raises(ValueError, match="labels: tree structure differs from params"):
        ao.partition({"w": "matrix"}, {"matrix": ao.adam()}).init(params)
    with pytest.raises(TypeError, match=r"mask leaf \['b'\]: expected a bool, got int"):
        ao.masked(ao.adam(), {"w": True, "b": 1}).init(params)


def test_nonfinite_gradient_raises_with_its_full_path_and_skips_every_group():
    params = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}
    bad = {"w": np.ones((3, 2), np.float32), "b": np.array([1.0, np.nan], np.float32)}
    opt = ao.partition(by_rank, {"matrix": ao.adam(0.1), "vector": ao.sgd(0.1)})
    state = opt.init(params)
    before = snapshot(state)
    with pytest.raises(ValueError, match=r"grads leaf \['b'\]: contains NaN or Inf"):
        opt.step(params, bad, state)
    assert snapshot(state) == before
    skip = ao.partition(by_rank, {"matrix": ao.adam(0.1), "vector": ao.sgd(0.1)}, on_nonfinite="skip")
    p, s = skip.step(params, bad, skip.init(params))
    assert s["nonfinite_skipped"] == 1 and s["count"] == 0 and s["inner"][0]["count"] == 0
    assert np.all(p["w"] == 1.0)


def test_threads_share_one_partition_bit_identically():
    opt = ao.partition(by_rank, {"matrix": ao.sonew(1e-2, band=1), "vector": ao.adam(1e-2)})
    shapes = {"w": (40, 50), "b": (50,)}
    seq = {i: _run(opt, i, "auto", 5, shapes) for i in range(3)}
    par = _threaded(lambda i, barrier: _run(opt, i, "auto", 5, shapes, barrier=barrier), 3)
    _assert_same(seq, par)


def test_explain_names_each_groups_path():
    params = {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float16)}
    opt = ao.partition(by_rank, {"matrix": ao.adam(0.1), "vector": ao.sgd(0.1)})
    e = ao.explain(opt, params)
    assert e.backend == "per group"
    w, b = e.leaves
    assert w.path == "['w']" and w.reason.startswith("group 'matrix' (adam): ")
    assert b.path == "['b']" and b.reason.startswith("group 'vector' (sgd): ") and b.backend == "reference"
