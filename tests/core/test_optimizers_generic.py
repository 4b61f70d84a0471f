"""Generic tests driven by the optimizer records: every optimizer gets all of them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import arrayopt as ao
from _arrays import asarray, assert_trees_close, float_array_dtypes, require, snapshot, to_numpy, tree_map
from records import CASE_IDS, CASES, RECORDS

REC_IDS = [r.name for r in RECORDS]


def quadratic(seed=0, dtype="float64"):
    """f(x) = ½ Σ a (x - c)², params tree {"w": (4, 3), "b": (3,)}."""
    rng = np.random.default_rng(seed)
    a = {"w": rng.uniform(0.5, 2.0, (4, 3)), "b": rng.uniform(0.5, 2.0, 3)}
    c = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    x0 = {"w": np.zeros((4, 3), dtype), "b": np.zeros(3, dtype)}

    def loss(x):
        return sum(0.5 * float(np.sum(a[k] * (to_numpy(x[k]) - c[k]) ** 2)) for k in a)

    def grad(x):
        return {k: (a[k] * (to_numpy(x[k]) - c[k])).astype(dtype) for k in a}

    return x0, loss, grad


@pytest.mark.parametrize("rec,config", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_converges_on_convex_problem(rec, config, backend):
    params, loss, grad = quadratic()
    opt = rec.factory(**config)
    state = opt.init(params)
    start = loss(params)
    with ao.dispatch.use_backend(None if backend == "auto" else backend):
        for _ in range(rec.converge_steps):
            params, state = opt.step(params, grad(params), state)
    assert state["count"] == rec.converge_steps
    assert loss(params) < rec.converge_factor * start


@pytest.mark.parametrize("rec", RECORDS, ids=REC_IDS)
def test_invalid_hyperparameters_raise_named_errors(rec):
    base = dict(rec.configs[0])
    for kwargs, err, regex in rec.invalid:
        with pytest.raises(err, match=regex):
            rec.factory(**{**base, **kwargs})


# ---------------------------------------------------------------- bad inputs leave state unchanged


def _setup(rec, lib="numpy", dtype="float32"):
    rng = np.random.default_rng(1)
    params = {"w": asarray(lib, rng.normal(size=(5, 4)), dtype), "b": asarray(lib, rng.normal(size=4), dtype)}
    opt = rec.factory(**rec.configs[0])
    state = opt.init(params)
    g = {"w": asarray(lib, rng.normal(size=(5, 4)), dtype), "b": asarray(lib, rng.normal(size=4), dtype)}
    params, state = opt.step(params, g, state)  # non-trivial state
    return opt, params, state, g


def _bad_grads(lib, g, dtype):
    import torch

    rng = np.random.default_rng(2)
    nan = rng.normal(size=(5, 4))
    nan[2, 1] = np.nan
    inf = rng.normal(size=4)
    inf[0] = -np.inf
    return [
        ({"w": asarray(lib, nan, dtype), "b": g["b"]}, ValueError, r"grads leaf \['w'\]: contains NaN or Inf"),
        ({"w": g["w"], "b": asarray(lib, inf, dtype)}, ValueError, r"grads leaf \['b'\]: contains NaN or Inf"),
        ({"w": asarray(lib, np.ones((4, 5)), dtype), "b": g["b"]}, ValueError, r"grads leaf \['w'\]: shape \(4, 5\)"),
        ({"w": asarray(lib, np.ones((5, 4)), "float64" if dtype == "float32" else "float32"), "b": g["b"]},
         TypeError, r"grads leaf \['w'\]: dtype"),
        ({"w": g["w"]}, ValueError, "grads: tree structure differs"),
        ({"w": g["w"], "b": g["b"], "c": g["b"]}, ValueError, "grads: tree structure differs"),
        ({"w": torch.ones(5, 4), "b": g["b"]} if lib != "torch" else {"w": np.ones((5, 4), np.float32), "b": g["b"]},
         TypeError, r"grads leaf \['w'\]: array namespace"),
        ({"w": [1.0] * 20, "b": g["b"]}, ValueError, "grads: tree structure differs"),
        ({"w": None, "b": g["b"]}, TypeError, r"grads leaf \['w'\]: expected an array"),
        ({}, ValueError, "grads: "),
    ]


@pytest.mark.parametrize("rec", RECORDS, ids=REC_IDS)
@pytest.mark.parametrize("lib", ["numpy", "torch", "array_api_strict", "jax"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_inputs_raise_and_leave_state_unchanged(rec, lib, backend):
    require(lib)
    require("torch")
    with ao.dispatch.use_backend(None if backend == "auto" else backend):
        opt, params, state, g = _setup(rec, lib)
        before_state, before_params = snapshot(state), snapshot(params)
        for bad, err, regex in _bad_grads(lib, g, "float32"):
            for call in ("update", "step"):
                with pytest.raises(err, match=regex):
                    if call == "update":
                        opt.update(bad, state, params)
                    else:
                        opt.step(params, bad, state)
                assert snapshot(state) == before_state, (call, regex)
                assert snapshot(params) == before_params, (call, regex)
        # the state still works after all rejections
        params, state = opt.step(params, g, state)
        assert state["count"] == 2


@pytest.mark.parametrize("rec", RECORDS, ids=REC_IDS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_nonfinite_skip_counts_and_keeps_params(rec, backend):
    opt = rec.factory(**rec.configs[0], on_nonfinite="skip")
    params = {"w": np.ones((3, 2), np.float32)}
    state = opt.init(params)
    bad = {"w": np.array([[1, 2], [np.inf, 1], [0, 0]], np.float32)}
    before = snapshot(params)
    with ao.dispatch.use_backend(None if backend == "auto" else backend):
        params, state = opt.step(params, bad, state)
        assert snapshot(params) == before
        assert state["nonfinite_skipped"] == 1 and state["count"] == 0
        updates, state = opt.update(bad, state, params)
        assert not np.any(updates["w"]) and state["nonfinite_skipped"] == 2
        params, state = opt.step(params, {"w": np.ones((3, 2), np.float32)}, state)
        assert state["count"] == 1 and state["nonfinite_skipped"] == 2


@pytest.mark.parametrize("rec", RECORDS, ids=REC_IDS)
def test_bad_params_and_state_are_rejected(rec):
    opt = rec.factory(**rec.configs[0])
    with pytest.raises(ValueError, match="params: empty tree"):
        opt.init({})
    with pytest.raises(ValueError, match="params: empty tree"):
        opt.init([{}, ()])
    with pytest.raises(TypeError, match=r"params leaf \['n'\]: dtype int64 is not a real floating dtype"):
        opt.init({"w": np.ones(3, np.float32), "n": np.ones(3, np.int64)})
    with pytest.raises(TypeError, match=r"params leaf \[1\]: dtype bool is not a real floating dtype"):
        opt.init([np.ones(3), np.ones(3, bool)])
    with pytest.raises(TypeError, match=r"params leaf \[0\]: expected an array"):
        opt.init([1.0, np.ones(3)])
    torch = pytest.importorskip("torch", reason="torch is needed for the mixed-namespace case")
    with pytest.raises(TypeError, match=r"params leaf \['b'\]: array namespace torch differs"):
        opt.init({"a": np.ones(3), "b": torch.ones(3)})
    xps = pytest.importorskip("array_api_strict", reason="array-api-strict simulates devices")
    with pytest.raises(ValueError, match=r"params leaf \['b'\]: device"):
        opt.init({"a": xps.ones(3), "b": xps.ones(3, device=xps.Device("device1"))})

    params = {"w": np.ones((3, 2), np.float32)}
    state = opt.init(params)
    g = {"w": np.ones((3, 2), np.float32)}
    other = {"w": np.ones((2, 3), np.float32)}
    with pytest.raises(ValueError, match="made by optimizer"):
        opt.update(g, ao.adagrad(0.1).init(params) if rec.name != "adagrad" else ao.adam().init(params), params)
    with pytest.raises(TypeError, match="state: expected the dict"):
        opt.step(params, g, [state])
    if rec.factory(**rec.configs[0]).init(params).keys() - {"optimizer", "count", "nonfinite_skipped"}:
        with pytest.raises(ValueError, match=r"state\[.*\] leaf \['w'\]: shape \(2, 3\)"):
            opt.step(params, g, opt.init(other))
    # strict devices: grads on another device than params
    p = {"w": xps.ones((3, 2))}
    st = opt.init(p)
    with pytest.raises(ValueError, match=r"grads leaf \['w'\]: device"):
        opt.step(p, {"w": xps.ones((3, 2), device=xps.Device("device1"))}, st)


# ---------------------------------------------------------------- state round trip


@pytest.mark.parametrize("rec,config", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("lib,dtype", [("numpy", "float32"), ("numpy", "float64"), ("torch", "float32"),
                                       ("torch", "bfloat16"), ("jax", "float32"), ("array_api_strict", "float64")])
def test_save_load_mid_run_then_step_is_bit_identical(rec, config, lib, dtype, tmp_path):
    require(lib)
    opt = rec.factory(**config)
    rng = np.random.default_rng(3)
    params = {"layer": [asarray(lib, rng.normal(size=(4, 3)), dtype), asarray(lib, rng.normal(size=3), dtype)]}
    state = opt.init(params)
    grads = [{"layer": [asarray(lib, rng.normal(size=(4, 3)), dtype), asarray(lib, rng.normal(size=3), dtype)]}
             for _ in range(6)]
    for g in grads[:5]:
        params, state = opt.step(params, g, state)
    path = tmp_path / "state.npz"
    ao.save_state(state, path)
    loaded = ao.load_state(path, like=state)
    assert snapshot(loaded) == snapshot(state)
    assert type(loaded["count"]) is int and loaded["count"] == 5
    params2 = tree_map(lambda x: asarray(lib, to_numpy(x), dtype), params)
    p1, s1 = opt.step(params, grads[5], state)
    p2, s2 = opt.step(params2, grads[5], loaded)
    assert snapshot(p1) == snapshot(p2)
    assert snapshot(s1) == snapshot(s2)


def test_load_state_rejects_mismatched_like(tmp_path):
    opt = ao.adam()
    state = opt.init({"w": np.ones(3, np.float32)})
    ao.save_state(state, tmp_path / "s.npz")
    with pytest.raises(ValueError, match=r"state\['mu'\]\[0\]: saved float32\[3\], like= has float32\[4\]"):
        ao.load_state(tmp_path / "s.npz", like=opt.init({"w": np.ones(4, np.float32)}))
    with pytest.raises(ValueError, match="saved keys"):
        ao.load_state(tmp_path / "s.npz", like=ao.adagrad().init({"w": np.ones(3, np.float32)}))
    plain = ao.load_state(tmp_path / "s.npz")
    assert isinstance(plain["mu"][0], np.ndarray) and plain["count"] == 0


# ---------------------------------------------------------------- update vs step


@pytest.mark.parametrize("rec,config", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_update_then_apply_matches_step(rec, config, dtype, backend):
    opt = rec.factory(**config)
    rng = np.random.default_rng(4)
    params = {"a": rng.normal(size=(6, 5)).astype(dtype), "b": rng.normal(size=7).astype(dtype)}
    s_upd = opt.init(params)
    s_step = opt.init(params)
    p_upd = tree_map(np.copy, params)
    p_step = tree_map(np.copy, params)
    with ao.dispatch.use_backend(None if backend == "auto" else backend):
        for _ in range(4):
            g = {"a": rng.normal(size=(6, 5)).astype(dtype), "b": rng.normal(size=7).astype(dtype)}
            g_copy = tree_map(np.copy, g)
            p_before = snapshot(p_upd)
            updates, s_upd = opt.update(g, s_upd, p_upd)
            assert snapshot(g) == snapshot(g_copy) and snapshot(p_upd) == p_before  # update mutates nothing
            p_upd = ao.apply_updates(p_upd, updates)
            p_step, s_step = opt.step(p_step, g, s_step)
    rtol, atol = rec.rtol[dtype], rec.atol[dtype]
    assert_trees_close(p_step, p_upd, rtol, atol, "params")
    assert_trees_close(s_step, s_upd, rtol, atol, "state")


def test_step_returns_same_objects_when_writeable_and_new_ones_otherwise():
    torch = pytest.importorskip("torch", reason="torch CPU tensors are one of the in-place cases")
    opt = ao.adam(0.1)
    p = {"w": np.ones(4, np.float32)}
    out, _ = opt.step(p, {"w": np.ones(4, np.float32)}, opt.init(p))
    assert out["w"] is p["w"]
    t = {"w": torch.ones(4, requires_grad=True)}
    out, _ = opt.step(t, {"w": torch.ones(4)}, opt.init(t))
    assert out["w"] is t["w"] and float(t["w"].detach()[0]) < 1
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    out, _ = opt.step({"w": ro}, {"w": np.ones(4, np.float32)}, opt.init({"w": ro}))
    assert out["w"] is not ro and float(ro[0]) == 1.0 and float(out["w"][0]) < 1
    jnp = pytest.importorskip("jax.numpy", reason="jax arrays are immutable")
    j = {"w": jnp.ones(4)}
    out, _ = opt.step(j, {"w": jnp.ones(4)}, opt.init(j))
    assert out["w"] is not j["w"] and float(j["w"][0]) == 1.0


def test_low_precision_params_keep_float32_state():
    torch = pytest.importorskip("torch", reason="bfloat16 arrays need torch")
    for rec in RECORDS:
        opt = rec.factory(**rec.configs[0])
        p = {"w": torch.randn(8, 3, dtype=torch.bfloat16), "h": torch.randn(5, dtype=torch.float16)}
        s = opt.init(p)
        assert float_array_dtypes(s) <= {"float32"}, rec.name
        for _ in range(3):
            g = {"w": torch.randn(8, 3, dtype=torch.bfloat16) * 1e-3, "h": torch.randn(5, dtype=torch.float16)}
            p, s = opt.step(p, g, s)
        assert p["w"].dtype == torch.bfloat16 and p["h"].dtype == torch.float16
        assert all(bool(torch.isfinite(v).all()) for v in p.values())


# ---------------------------------------------------------------- state that cannot be misused


def _leaf_state(state, i, n):
    """The per-leaf entries of ``state`` for leaf ``i`` of ``n`` (lists of one entry per leaf)."""
    return {k: v[i] for k, v in state.items()
            if k != "param_paths" and isinstance(v, (list, tuple)) and len(v) == n}


@pytest.mark.parametrize("rec,config", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_zero_size_leaves_are_accepted_and_do_not_change_the_others(rec, config, backend):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(5, 4))
    with ao.dispatch.use_backend(None if backend == "auto" else backend):
        for call in ("step", "update"):
            opt = rec.factory(**config)
            params = {"z": np.ones((0, 3), np.float32), "a": a.astype(np.float32), "e": np.ones(0, np.float32)}
            alone = {"a": a.astype(np.float32)}
            s, s_alone = opt.init(params), opt.init(alone)
            for _ in range(3):
                g = rng.normal(size=(5, 4)).astype(np.float32)
                grads = {"z": np.ones((0, 3), np.float32), "a": g, "e": np.ones(0, np.float32)}
                if call == "step":
                    params, s = opt.step(params, grads, s)
                    alone, s_alone = opt.step(alone, {"a": g.copy()}, s_alone)
                else:
                    u, s = opt.update(grads, s, params)
                    assert u["z"].shape == (0, 3) and u["e"].shape == (0,)
                    params = ao.apply_updates(params, u)
                    u, s_alone = opt.update({"a": g.copy()}, s_alone, alone)
                    alone = ao.apply_updates(alone, u)
            assert s["count"] == 3 and params["z"].shape == (0, 3)
            assert snapshot(params["a"]) == snapshot(alone["a"]), call
            assert snapshot(_leaf_state(s, 1, 3)) == snapshot(_leaf_state(s_alone, 0, 1)), call
            # a tree of zero-size leaves only: a step that counts and changes nothing
            empty = {"z": np.ones((0, 2), np.float32)}
            p, s = opt.step(empty, {"z": np.ones((0, 2), np.float32)}, opt.init(empty))
            assert s["count"] == 1 and p["z"].shape == (0, 2)


@pytest.mark.parametrize("rec", RECORDS, ids=REC_IDS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_tied_weights_raise_before_anything_is_written(rec, backend):
    opt = rec.factory(**rec.configs[0])
    w = np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match=r"params leaves \['a'\] and \['b'\]: the same array \(tied weights\)"):
        opt.init({"a": w, "b": w})
    flat = np.ones(12, np.float32)  # overlapping views of one buffer, also rejected at init()
    with pytest.raises(ValueError, match=r"params leaves \[0\] and \[1\]: views of overlapping memory"):
        opt.init([flat[:8], flat[4:]])
    opt.init([flat[:6], flat[6:]])  # disjoint views of one buffer are separate params
    with ao.dispatch.use_backend(None if backend == "auto" else backend):
        params = {"a": np.ones((5, 4), np.float32), "b": np.full((5, 4), 2.0, np.float32)}
        state = opt.init(params)
        tied = {"a": params["a"], "b": params["a"]}
        grads = {"a": np.ones((5, 4), np.float32), "b": np.ones((5, 4), np.float32)}
        before_s, before_p = snapshot(state), snapshot(params)
        for call in ("step", "update"):
            with pytest.raises(ValueError, match=r"params leaves \['a'\] and \['b'\]: the same array"):
                opt.step(tied, grads, state) if call == "step" else opt.update(grads, state, tied)
            assert snapshot(state) == before_s and snapshot(params) == before_p
        with pytest.raises(ValueError, match=r"params leaves \['a'\] and \['b'\]: the same array"):
            ao.apply_updates(tied, grads)


def _unmarked(tree):
    """``tree`` without the ``consumed`` marks (of the state and of nested states)."""
    if isinstance(tree, dict):
        return {k: _unmarked(v) for k, v in tree.items() if k != "consumed"}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_unmarked(v) for v in tree)
    return tree


@pytest.mark.parametrize("rec", RECORDS, ids=REC_IDS)
@pytest.mark.parametrize("lib", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_a_consumed_state_passed_again_raises_on_every_path(rec, lib, backend):
    require(lib)
    rng = np.random.default_rng(6)
    with ao.dispatch.use_backend(None if backend == "auto" else backend):
        for wrap in (False, True):  # the optimizer alone, and inside a chain
            opt = rec.factory(**rec.configs[0])
            if wrap:
                opt = ao.chain(ao.scale(1.0), opt)
            params = {"w": asarray(lib, rng.normal(size=(5, 4)), "float32")}
            g = {"w": asarray(lib, rng.normal(size=(5, 4)), "float32")}
            s0 = opt.init(params)
            params, s1 = opt.step(params, g, s0)
            for call in ("step", "update"):
                for old in (s0, dict(s0)):  # a plain copy of a consumed state is consumed too
                    with pytest.raises(ValueError, match=r"^state: already consumed by an earlier update"):
                        opt.step(params, g, old) if call == "step" else opt.update(g, old, params)
            before = snapshot(_unmarked(s1))
            u, s2 = opt.update(g, s1, params)  # the returned state works; it is consumed in turn
            assert s2["count"] == 2 and s1["consumed"] is True and s2["consumed"] is False
            with pytest.raises(ValueError, match="already consumed"):
                opt.update(g, s1, params)
            assert snapshot(_unmarked(s1)) == before  # update() and the rejected calls changed nothing else
            if wrap:  # an inner state that was consumed is caught too
                with pytest.raises(ValueError, match=r"^state\['inner'\]\[1\]: already consumed"):
                    opt.update(g, dict(s2, inner=[s2["inner"][0], s1["inner"][1]]), params)


@pytest.mark.parametrize("rec", RECORDS, ids=REC_IDS)
def test_state_of_another_params_tree_is_rejected(rec):
    opt = rec.factory(**rec.configs[0])
    state = opt.init({"w": np.ones((5, 4), np.float32), "b": np.ones(4, np.float32)})
    renamed = {"weight": np.ones((5, 4), np.float32), "b": np.ones(4, np.float32)}
    g = {"weight": np.ones((5, 4), np.float32), "b": np.ones(4, np.float32)}
    before = snapshot(state)
    with pytest.raises(ValueError, match=r"params: leaf 0 is \['weight'\], but the state was made by init\(\) "
                                         r"for a tree whose leaf 0 is \['w'\]"):
        opt.step(renamed, g, state)
    with pytest.raises(ValueError, match=r"grads: leaf 0 is \['weight'\]"):
        opt.update(g, state)
    assert snapshot(state) == before


def _numpy_ints(config, kind):
    return {k: kind(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in config.items()}


@pytest.mark.parametrize("rec,config", CASES, ids=CASE_IDS)
def test_numpy_integer_hyperparameters_are_accepted(rec, config):
    ints = [k for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)]
    runs = []
    for cfg in (config, _numpy_ints(config, np.int64), _numpy_ints(config, np.int32)):
        opt = rec.factory(**cfg)
        params, _, grad = quadratic()
        state = opt.init(params)
        for _ in range(3):
            params, state = opt.step(params, grad(params), state)
        runs.append(snapshot(params))
    assert runs[1] == runs[0] and runs[2] == runs[0], ints


_SHAPES = st.lists(st.lists(st.integers(0, 3), max_size=3).map(tuple), min_size=1, max_size=4)


@given(rec=st.sampled_from(RECORDS), shapes=_SHAPES, backend=st.sampled_from(["auto", "reference"]))
def test_trees_with_zero_size_leaves_step_like_the_trees_without_them(rec, shapes, backend):
    rng = np.random.default_rng(8)
    params = [rng.normal(size=s).astype(np.float32) for s in shapes]
    keep = [i for i, p in enumerate(params) if p.size > 0]
    opt = rec.factory(**rec.configs[0])
    s = opt.init(params)
    sub = [params[i].copy() for i in keep]
    s_sub = opt.init(sub) if keep else None
    with ao.dispatch.use_backend(None if backend == "auto" else backend):
        for _ in range(2):
            g = [rng.normal(size=p.shape).astype(np.float32) for p in params]
            params, s = opt.step(params, g, s)
            if keep:
                sub, s_sub = opt.step(sub, [g[i].copy() for i in keep], s_sub)
    assert s["count"] == 2 and [p.shape for p in params] == shapes
    assert snapshot([params[i] for i in keep]) == snapshot(sub)
