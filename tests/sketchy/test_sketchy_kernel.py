"""Sketchy's fused Numba step (``backends/numba_cpu/sketchy.py``) against the reference step.

The low-rank apply is the same namespace code on both paths; the kernels fuse the graft
norms, momentum, weight decay and the parameter write, so params and state agree to
rounding (float64 1e-12, float32 1e-6, relative to the leaf's largest entry: the graft norms are
float64 sums in the kernel, float32 sums in the reference) for every record config and each fused graft.
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao
from arrayopt import dispatch
from arrayopt._xp import resolve
from records import RECORDS

pytest.importorskip("numba", reason="the numba_cpu backend needs numba")

CONFIGS = list(next(r for r in RECORDS if r.name == "sketchy").configs) + [
    {"learning_rate": 0.05, "rank": 3, "graft": "adagrad", "weight_decay": 1e-2, "start_preconditioning_step": 3},
    {"learning_rate": 0.01, "rank": 2, "graft": "none", "b1": 0.0},
    {"learning_rate": 0.05, "rank": 2, "graft": "rmsprop", "b1": 0.0, "weight_decay": 1e-3},
]
SHAPES = {"w": (24, 40), "b": (40,), "c": (3, 4, 5), "big": (8, 5000)}  # "big": the parallel kernels
TOL = {"float64": 1e-12, "float32": 1e-6}


def _run(cfg, dtype, backend, steps=4):
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    opt = ao.sketchy(**cfg)
    state = opt.init(params)
    with dispatch.use_backend(backend):
        for _ in range(steps):
            grads = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
            params, state = opt.step(params, grads, state)
    return params, state


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("k", range(len(CONFIGS)))
def test_numba_matches_reference(k, dtype):
    cfg = CONFIGS[k]
    p_ref, s_ref = _run(cfg, dtype, "reference")
    p_nb, s_nb = _run(cfg, dtype, "numba_cpu")
    tol = TOL[dtype]
    def close(a, b, what):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(b)))), err_msg=what)

    for name in p_ref:
        close(p_nb[name], p_ref[name], f"params {name}")
    for key in ("graft", "momentum"):
        for i, (a, b) in enumerate(zip(s_nb.get(key, []), s_ref.get(key, []))):
            close(a, b, f"state[{key!r}] leaf {i}")
    assert s_nb["count"] == s_ref["count"] and s_nb["sketch_skipped"] == s_ref["sketch_skipped"]


def test_numba_is_chosen_and_declines_unfused_grafts():
    params = {"w": np.ones((8, 6))}
    grads = {"w": np.ones((8, 6))}
    opt = ao.sketchy(rank=2)
    state = opt.init(params)
    groups = opt._kernel_groups([params["w"]], [grads["w"]], state)
    ns = resolve(params["w"])
    choice = dispatch.choose(opt.kernel_op, ns, opt.step_description(0), *groups)
    assert choice.backend is not None and choice.backend.name == "numba_cpu", choice.reason
    for graft in ("sqrt_n", "rmsprop_normalized"):
        opt = ao.sketchy(rank=2, graft=graft)
        state = opt.init(params)
        choice = dispatch.choose(opt.kernel_op, ns, opt.step_description(0),
                                 *opt._kernel_groups([params["w"]], [grads["w"]], state))
        assert choice.backend is None and f"graft={graft!r} is not fused" in choice.reason


@pytest.mark.parametrize("scale", [1e200, 1e-170])
def test_float64_norms_past_float64_squares_take_the_scaled_norm(scale):
    """Squares of 1e200 overflow and of 1e-170 underflow in float64: the driver then takes the
    reference's scaled norms (:func:`arrayopt.grafting.norm`), so ``u = (‖g‖/‖D‖)·D`` still holds."""
    from arrayopt import grafting
    from arrayopt.backends.numba_cpu import BACKEND
    from arrayopt.backends.numba_cpu.sketchy import run
    from arrayopt.sketchy.step import SketchyStep

    rng = np.random.default_rng(3)
    g, d = rng.standard_normal(50) * scale, rng.standard_normal(50) * scale
    p = np.zeros(50)
    step = SketchyStep(lr=0.1, graft="sgd", graft_b2=0.999, graft_eps=1e-8, graft_bc2=1e-3, b1=0.0, ema=False,
                       nesterov=False, weight_decay=0.0)
    run(BACKEND, "sketchy", [p], [g], [None, None, [d]], step)
    want = -0.1 * (d * (grafting.norm(np, g) / grafting.norm(np, d)))
    np.testing.assert_allclose(p, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("graft,b1,ema", [("adam", 0.9, False), ("sgd", 0.0, False), ("none", 0.9, True),
                                          ("adagrad", 0.5, False)])
def test_small_torch_leaves_by_address_equal_the_per_leaf_path(dtype, graft, b1, ema, monkeypatch):
    """The small torch leaves go to one call per dtype (address tables, ``_run_small``); the same
    leaves as NumPy arrays take one call per leaf: bit for bit the same params and state. Leaves with
    and without a direction, a non-contiguous direction (per-leaf path), and a zero direction."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from arrayopt.backends.numba_cpu import BACKEND
    from arrayopt.backends.numba_cpu import sketchy as kernels
    from arrayopt.sketchy.step import SketchyStep

    by_address = []
    run_small = kernels._run_small
    monkeypatch.setattr(kernels, "_run_small", lambda *a: by_address.append(len(a[2])) or run_small(*a))
    rng = np.random.default_rng(5)
    shapes = [(7,), (3, 4), (5, 6), (1,), (8, 2), (9,)]
    arrays = {n: [rng.standard_normal(s).astype(dtype) for s in shapes] for n in ("p", "g", "d")}
    arrays["acc"] = [np.abs(rng.standard_normal(s)).astype(dtype) for s in shapes]
    arrays["m"] = [rng.standard_normal(s).astype(dtype) for s in shapes]
    arrays["d"][1] = np.asfortranarray(arrays["d"][1])  # torch: not contiguous, the per-leaf path
    arrays["d"][2][...] = 0  # the zero guard
    step = SketchyStep(lr=0.1, graft=graft, graft_b2=0.99, graft_eps=1e-8, graft_bc2=0.3, b1=b1, ema=ema,
                       nesterov=not ema, weight_decay=0.01)
    has = [True, True, True, False, True, False]
    accs = None if graft in ("sgd", "none") else "acc"
    moms = "m" if b1 > 0 else None

    def run(conv):
        a = {n: [conv(x.copy(order="K")) for x in v] for n, v in arrays.items()}
        dirs = [d if h else None for d, h in zip(a["d"], has)]
        BACKEND.run("sketchy", a["p"], a["g"], [a[accs] if accs else None, a[moms] if moms else None, dirs], step)
        return {n: [np.asarray(x) for x in a[n]] for n in ("p", "acc", "m")}

    want = run(lambda x: x)
    assert by_address == []
    got = run(lambda x: torch.from_numpy(x) if x.flags.c_contiguous else torch.from_numpy(x.T.copy()).T)
    assert by_address == [len(shapes) - 1]  # all but the leaf of the non-contiguous direction
    for n in want:
        for x, y in zip(got[n], want[n]):
            np.testing.assert_array_equal(x, y)
