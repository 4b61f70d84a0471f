"""Every optimizer record on a CUDA device: CuPy arrays and torch CUDA tensors.

Parity with the NumPy reference (kernel or reference path on the device), save/load of
device state continuing bit for bit, and bad inputs named with the state unchanged.
These run in ``python -m arrayopt.gpu_check`` and skip without a device.
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao
from _arrays import snapshot, to_numpy, tree_map
from arrayopt import dispatch
from arrayopt.backends import cupy_cuda
from records import CASE_IDS, CASES, RECORDS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cupy_cuda.BACKEND.available(),
                                 reason="needs a CUDA device and cupy")]

SHAPES = {"w": (33, 17), "b": (5,)}


def _host_tree(seed, dtype):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def _cupy(tree):
    import cupy

    return tree_map(cupy.asarray, tree)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rec,config", CASES, ids=CASE_IDS)
def test_device_steps_match_numpy_reference(rec, config, dtype):
    opt = rec.factory(**config)
    host = _host_tree(0, dtype)
    ref = {k: v.copy() for k, v in host.items()}
    params = _cupy(host)
    state, ref_state = opt.init(params), opt.init(ref)
    for t in range(4):
        g = _host_tree(t + 1, dtype)
        params, state = opt.step(params, _cupy(g), state)
        with dispatch.use_backend("reference"):
            ref, ref_state = opt.step(ref, g, ref_state)
    assert type(params["w"]).__module__.startswith("cupy")
    for k in host:
        np.testing.assert_allclose(to_numpy(params[k]), ref[k], rtol=rec.rtol[dtype],
                                   atol=rec.atol[dtype], err_msg=f"{rec.name} {k}")
    assert state["count"] == ref_state["count"] == 4


@pytest.mark.parametrize("rec,config", CASES, ids=CASE_IDS)
def test_device_state_save_load_continues_bit_exact(rec, config, tmp_path):
    opt = rec.factory(**config)
    params = _cupy(_host_tree(0, "float32"))
    state = opt.init(params)
    for t in range(2):
        params, state = opt.step(params, _cupy(_host_tree(t + 1, "float32")), state)
    path = tmp_path / "state.npz"
    ao.save_state(state, path)
    loaded = ao.load_state(path, like=state)
    for leaf in _arrays_of(loaded):
        assert type(leaf).__module__.startswith("cupy"), type(leaf)
    other = {k: v.copy() for k, v in params.items()}
    for t in range(2):
        g = _host_tree(t + 10, "float32")
        params, state = opt.step(params, _cupy(g), state)
        other, loaded = opt.step(other, _cupy(g), loaded)
    assert snapshot(params) == snapshot(other)
    assert snapshot(state) == snapshot(loaded)


def _arrays_of(tree):
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in _arrays_of(v)]
    if isinstance(tree, (list, tuple)):
        return [a for v in tree for a in _arrays_of(v)]
    return [] if isinstance(tree, (int, float, str, bool, type(None))) else [tree]


@pytest.mark.parametrize("name", ["adam", "sgd", "adagrad", "sonew", "shampoo"])
def test_device_bad_inputs_are_named_and_leave_state_unchanged(name):
    import cupy

    opt = {"adam": ao.adam(0.1), "sgd": ao.sgd(0.1, momentum=0.9), "adagrad": ao.adagrad(0.1),
           "sonew": ao.sonew(0.1), "shampoo": ao.shampoo(0.1)}[name]
    params = _cupy(_host_tree(0, "float32"))
    state = opt.init(params)
    params, state = opt.step(params, _cupy(_host_tree(1, "float32")), state)
    before_p, before_s = snapshot(params), snapshot(state)
    good = _host_tree(2, "float32")
    nan = dict(good, w=good["w"].copy())
    nan["w"][3, 4] = np.nan
    cases = [
        ({k: v for k, v in good.items()}, TypeError, r"grads leaf \['w'\]: array namespace"),
        (dict(_cupy(good), w=cupy.ones((17, 33), cupy.float32)), ValueError, r"grads leaf \['w'\]: shape"),
        (dict(_cupy(good), w=cupy.ones((33, 17), cupy.float64)), TypeError, r"grads leaf \['w'\]: dtype"),
        (_cupy(nan), ValueError, r"grads leaf \['w'\]: contains NaN or Inf"),
    ]
    for grads, err, regex in cases:
        with pytest.raises(err, match=regex):
            opt.step(params, grads, state)
        assert snapshot(params) == before_p and snapshot(state) == before_s, regex
    with pytest.raises(TypeError, match=r"params leaf \['w'\]: dtype int32"):
        opt.init({"w": cupy.ones(3, cupy.int32)})


@pytest.mark.parametrize("name", ["adam", "sonew", "shampoo"])
def test_torch_cuda_tensors_match_numpy_reference(name):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device and cupy (torch sees no CUDA device)")
    opt = {"adam": ao.adam(0.01), "sonew": ao.sonew(0.01, band=3), "shampoo": ao.shampoo(0.01)}[name]
    host = _host_tree(0, "float32")
    ref = {k: v.copy() for k, v in host.items()}
    params = {k: torch.tensor(v, device="cuda") for k, v in host.items()}
    state, ref_state = opt.init(params), opt.init(ref)
    for t in range(3):
        g = _host_tree(t + 1, "float32")
        params, state = opt.step(params, {k: torch.tensor(v, device="cuda") for k, v in g.items()}, state)
        with dispatch.use_backend("reference"):
            ref, ref_state = opt.step(ref, g, ref_state)
    # the records' float32 tolerances: Shampoo's factor statistics are summed in another
    # order on the device (cuBLAS) and its roots amplify that (2e-3, as on every namespace)
    rec = next(r for r in RECORDS if r.name == {"sonew": "sonew_band4"}.get(name, name))
    for k in host:
        np.testing.assert_allclose(to_numpy(params[k]), ref[k], rtol=rec.rtol["float32"],
                                   atol=rec.atol["float32"], err_msg=f"{name} {k}")
