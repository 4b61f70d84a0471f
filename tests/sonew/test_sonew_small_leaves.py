"""Small SONew leaves stepped in one call per dtype (``backends/numba_cpu/sonew/small_leaves.py``) give
the per-leaf block driver's results bit for bit, with the same edge counters; the leaves it does
not take (large, F-ordered, ``rmsprop_normalized``) keep their own path."""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao

pytest.importorskip("numba", reason="the Numba backend needs numba")

from arrayopt.backends.numba_cpu import sonew as nb_sonew  # noqa: E402
from arrayopt.backends.numba_cpu.sonew import small_leaves  # noqa: E402

SHAPES = {"b1": (7,), "one": (1,), "w": (6, 5), "b2": (300,), "big": (70000,), "k": (3, 2, 4)}


def _tree(lib, rng, dtype):
    t = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    if lib == "torch":
        import torch

        return {k: torch.from_numpy(v) for k, v in t.items()}
    return t


def _run(lib, dtype, opt, batched, monkeypatch):
    if not batched:
        monkeypatch.setattr(nb_sonew, "takes", lambda *a: False)
    calls = []
    real = nb_sonew.run_small
    monkeypatch.setattr(nb_sonew, "run_small", lambda *a: calls.append(sorted(a[2])) or real(*a))
    rng = np.random.default_rng(4)
    params = _tree(lib, rng, dtype)
    state = opt.init(params)
    with ao.dispatch.use_backend("numba_cpu"):
        for t in range(4):
            grads = _tree(lib, rng, dtype)
            if t == 1:  # a constant gradient: strongly coupled neighbours
                for k in grads:
                    grads[k] = grads[k] * 0 + 1
            params, state = opt.step(params, grads, state)
    monkeypatch.undo()
    return params, state, calls


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [dict(), dict(band=0), dict(graft="sgd", weight_decay=0.01),
                                dict(small_param_fallback="adam", block_size=None), dict(graft="none")],
                         ids=["tri", "diag", "sgd-wd", "adam-fallback", "no-graft"])
def test_small_leaves_in_one_call_equal_the_per_leaf_driver(lib, dtype, kw, monkeypatch):
    if lib == "torch":
        pytest.importorskip("torch", reason="torch is not installed")
    opt = ao.sonew(0.05, **kw)
    got_p, got_s, calls = _run(lib, dtype, opt, True, monkeypatch)
    want_p, want_s, none = _run(lib, dtype, opt, False, monkeypatch)
    assert calls and not none
    for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(got_p[k]), np.asarray(want_p[k]), err_msg=k)
    for name in ("mu", "band", "removed_edges", "fallback_rows"):
        for a, b in zip(got_s[name], want_s[name]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_which_leaves_the_table_takes():
    opt = ao.sonew(0.05)
    step = opt.step_description(0)
    z = np.zeros

    def takes(shape, band=1, step=step, order="C"):
        leaf = z(shape, order=order)
        n = leaf.size
        return small_leaves.takes(step, leaf, (leaf, leaf, leaf), z((n, band + 1)), "numpy")

    assert takes((7,)) and takes((6, 5))
    assert not takes((70000,))  # SMALL or more entries: the parallel driver
    assert not takes((6, 5), band=4)  # the generated band drivers
    assert not takes((6, 5), order="F")  # not C-contiguous
    assert not takes((0,))
    assert not small_leaves.takes(ao.sonew(0.05, graft="rmsprop_normalized").step_description(0), z(7), (z(7),) * 3,
                                  z((7, 2)), "numpy")
    assert not small_leaves.takes(ao.sonew(0.05, block_size=None).step_description(0), z(7), (z(7),) * 3,
                                  z((7, 2)), "numpy")  # the whole-tensor kernels
