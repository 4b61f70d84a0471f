"""Per-leaf dispatch: the leaves a backend takes run its kernel, the others the reference alone.

A mixed tree (contiguous, ``channels_last`` and float16 leaves) steps each leaf on its own
path, with results equal to the all-reference run; a NaN in any leaf leaves params and state
bit-identical; ``ao.explain`` reports each leaf's path.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest

import arrayopt as ao
from arrayopt import dispatch

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")

OPTIMIZERS = {
    "adam": lambda: ao.adam(1e-2),
    "adamw": lambda: ao.adamw(1e-2, weight_decay=0.1),
    "sgd_momentum": lambda: ao.sgd(1e-2, momentum=0.9),
    "adagrad": lambda: ao.adagrad(1e-2),
    "sonew": lambda: ao.sonew(1e-2),
    "sonew_whole_band2": lambda: ao.sonew(1e-2, band=2, block_size=None),
    "sonew_F": lambda: ao.sonew(1e-2, flatten_order="F", block_size=64),
}
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 0.0}


def _tree(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6, 5, generator=g, dtype=torch.float64),
        "conv": torch.randn(8, 3, 3, 3, generator=g).to(memory_format=torch.channels_last),
        "conv3d": torch.randn(4, 2, 3, 3, 3, generator=g).to(memory_format=torch.channels_last_3d),
        "half": torch.randn(7, generator=g).to(torch.float16),
        "b": torch.randn(5, generator=g),
    }


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype).to(memory_format=_fmt(v)) for k, v in params.items()}


def _fmt(v):
    if v.dim() == 4 and not v.is_contiguous():
        return torch.channels_last
    if v.dim() == 5 and not v.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _spy(monkeypatch):
    """Record the params leaves each Numba kernel call receives (by their data pointers)."""
    from arrayopt.backends.numba_cpu import BACKEND

    seen = []
    real = BACKEND.run

    def run(op, params, *args, **kw):
        seen.extend(p.data_ptr() for p in params)
        return real(op, params, *args, **kw)

    monkeypatch.setattr(BACKEND, "run", run)
    return seen


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_mixed_tree_steps_each_leaf_on_its_path_like_the_reference(name, monkeypatch):
    opt = OPTIMIZERS[name]()
    fused, ref = _tree(0), _tree(0)
    s_fused, s_ref = opt.init(fused), opt.init(ref)
    seen = _spy(monkeypatch)
    for t in range(3):
        g = _grads(fused, 10 + t)
        fused, s_fused = opt.step(fused, g, s_fused)
        with dispatch.use_backend("reference"):
            ref, s_ref = opt.step(ref, copy.deepcopy(g), s_ref)
    kernel = {fused[k].data_ptr() for k in ("w", "conv", "conv3d", "b")}
    assert kernel <= set(seen) and fused["half"].data_ptr() not in seen
    assert fused["conv"].is_contiguous(memory_format=torch.channels_last)
    for k in fused:
        a, b = fused[k].double(), ref[k].double()
        assert torch.linalg.vector_norm(a - b) <= RTOL[fused[k].dtype] * torch.linalg.vector_norm(b), k
    assert s_fused["count"] == s_ref["count"] == 3
    for key in ("mu", "nu", "band", "trace"):
        for a, b in zip(s_fused.get(key, ()), s_ref.get(key, ())):
            a, b = a.double(), b.double()
            assert torch.linalg.vector_norm(a - b) <= 1e-6 * torch.linalg.vector_norm(b) + 1e-30, key


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "sonew", "sonew_whole_band2"])
@pytest.mark.parametrize("bad", ["w", "conv", "half", "b"])
def test_a_nan_in_any_leaf_leaves_params_and_state_bit_identical(name, bad):
    opt = ao.sonew(1e-2, on_nonfinite="skip") if name == "sonew" else OPTIMIZERS[name]()
    params = _tree(1)
    state = opt.init(params)
    params, state = opt.step(params, _grads(params, 2), state)
    g = _grads(params, 3)
    g[bad][(0,) * (g[bad].dim() - 1) + (1,)] = float("nan") if bad != "half" else float("inf")
    before_p = {k: v.clone() for k, v in params.items()}
    before_s = copy.deepcopy(state)
    if opt.on_nonfinite == "raise":
        with pytest.raises(ValueError, match=rf"grads leaf \['{bad}'\]: contains NaN or Inf"):
            opt.step(params, g, state)
    else:
        params, state = opt.step(params, g, state)
        assert state["nonfinite_skipped"] == 1
    for k in params:
        assert torch.equal(params[k], before_p[k]), k
    for key, v in before_s.items():
        if isinstance(v, list):
            for a, b in zip(state[key], v):
                assert torch.equal(a, b), key


def test_a_nonfinite_reference_update_writes_no_kernel_leaf():
    # the float16 leaf's update overflows float16 (a large param times a large weight decay);
    # the kernel's leaves must stay unwritten
    opt = ao.sgd(1.0, weight_decay=1e4)
    params = {"w": torch.ones(3), "half": torch.full((3,), 60000.0, dtype=torch.float16)}
    state = opt.init(params)
    g = {"w": torch.ones(3), "half": torch.ones(3, dtype=torch.float16)}
    before = {k: v.clone() for k, v in params.items()}
    with pytest.raises(ValueError, match=r"update leaf \['half'\]: not finite"):
        opt.step(params, g, state)
    assert all(torch.equal(params[k], before[k]) for k in params)


def test_explain_reports_each_leaf():
    e = ao.explain(ao.adam(), _tree(0))
    by = {lp.path: lp for lp in e.leaves}
    assert e.backend == "mixed" and "fused kernel for 4 of 5 leaves" in e.reason
    assert by["['conv']"].backend == by["['w']"].backend == "numba_cpu"
    assert by["['half']"].backend == "reference" and "dtype float16" in by["['half']"].reason
    assert ao.explain(ao.sonew(), {"c": _tree(0)["conv"]}).backend == "numba_cpu"


def test_strides_that_differ_from_the_params_send_the_leaf_to_the_reference():
    params = {"conv": torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last), "b": torch.randn(3)}
    state = ao.adam().init(params)
    state["mu"][0] = state["mu"][0].contiguous()  # e.g. a state made before the layout changed
    e = ao.explain(ao.adam(), params, state=state)
    by = {lp.path: lp for lp in e.leaves}
    assert by["['conv']"].backend == "reference" and "strides" in by["['conv']"].reason
    assert by["['b']"].backend == "numba_cpu"
    # SONew copies such a leaf to the logical C order, so any dense layout goes to the kernel
    assert ao.explain(ao.sonew(), params).backend == "numba_cpu"


def test_numpy_dense_permuted_leaves_run_over_their_storage():
    rng = np.random.default_rng(0)
    w = np.asfortranarray(rng.normal(size=(6, 4)).astype(np.float32))
    params, ref = {"w": w}, {"w": w.copy(order="F")}
    opt = ao.adam(1e-2)
    assert ao.explain(opt, params).backend == "numba_cpu"
    s, s_ref = opt.init(params), opt.init(ref)
    assert s["mu"][0].flags.f_contiguous
    g = {"w": np.asfortranarray(rng.normal(size=(6, 4)).astype(np.float32))}
    params, s = opt.step(params, g, s)
    with dispatch.use_backend("reference"):
        ref, s_ref = opt.step(ref, g, s_ref)
    assert params["w"] is w
    np.testing.assert_allclose(params["w"], ref["w"], rtol=1e-6)
    # a strided (non-dense) view is refused: its flat view would be a copy
    e = ao.explain(opt, {"v": np.zeros((6, 8), np.float32)[:, ::2]})
    assert e.backend == "reference" and "not a dense permuted layout" in e.leaves[0].reason


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "adagrad"])
def test_small_torch_leaves_in_one_call_match_the_reference(name, monkeypatch):
    # many small leaves of two dtypes (one address table each) and one large leaf (its own call)
    from arrayopt.backends.numba_cpu import first_order

    calls = []
    for k, fn in list(first_order._ADDR_KERNELS.items()):
        monkeypatch.setitem(first_order._ADDR_KERNELS, k, lambda addrs, sizes, *s, _fn=fn: (calls.append(len(sizes)),
                                                                                          _fn(addrs, sizes, *s)))
    shapes = [(3,), (4, 5), (1,), (2, 3, 2)] * 5

    def tree(seed):
        gen = torch.Generator().manual_seed(seed)
        out = {f"s{i}": torch.randn(s, generator=gen, dtype=torch.float32 if i % 3 else torch.float64)
               for i, s in enumerate(shapes)}
        out["large"] = torch.randn(40000, generator=gen)
        return out

    opt = OPTIMIZERS[name]()
    fused, ref = tree(0), tree(0)
    s_fused, s_ref = opt.init(fused), opt.init(ref)
    for t in range(3):
        grads = tree(10 + t)
        fused, s_fused = opt.step(fused, grads, s_fused)
        with dispatch.use_backend("reference"):
            ref, s_ref = opt.step(ref, grads, s_ref)
    assert sorted(calls[:2]) == [7, 13]  # float64 leaves, float32 leaves: one call each per step
    for k in fused:
        a, b = fused[k].double(), ref[k].double()
        assert torch.linalg.vector_norm(a - b) <= RTOL[fused[k].dtype] * torch.linalg.vector_norm(b), k
    bad = tree(20)
    bad["s7"][0, 1] = float("nan")
    before = {k: v.clone() for k, v in fused.items()}
    with pytest.raises(ValueError, match=r"grads leaf \['s7'\]"):
        opt.step(fused, bad, s_fused)
    assert all(torch.equal(fused[k], before[k]) for k in fused)


def test_a_lazy_negative_view_gradient_takes_the_reference_and_gives_its_result():
    """A float tensor with torch's negative bit (``torch._neg_view``) has no zero-copy NumPy view: its
    leaf takes the reference, the others keep the kernel, and the step equals the materialized one."""
    g = torch.randn(6, dtype=torch.float64)
    neg = torch._neg_view(-g)
    assert neg.is_neg()
    opt = ao.adam(0.1)
    a = {"w": torch.ones(6, dtype=torch.float64), "v": torch.ones(40000, dtype=torch.float64)}
    b = {k: v.clone() for k, v in a.items()}
    gv = torch.randn(40000, dtype=torch.float64)
    why = str(ao.explain(opt, a, {"w": neg, "v": gv}, opt.init(a)))
    assert "['w']" in why and "a lazy conj/neg view" in why
    a, _ = opt.step(a, {"w": neg, "v": gv}, opt.init(a))
    b, _ = opt.step(b, {"w": g.clone(), "v": gv}, opt.init(b))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
