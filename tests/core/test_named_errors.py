"""Inputs the math cannot take raise a named TypeError/ValueError before anything is written:
sparse torch gradients, meta-device torch tensors, SONew bands beyond the bound, mixed dtypes."""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao
from _arrays import require, snapshot
from records import RECORDS

REC_IDS = [r.name for r in RECORDS]


def _torch_setup(rec):
    import torch

    rng = np.random.default_rng(0)
    params = {"w": torch.tensor(rng.normal(size=(5, 4)), dtype=torch.float32),
              "b": torch.tensor(rng.normal(size=4), dtype=torch.float32)}
    opt = rec.factory(**rec.configs[0])
    state = opt.init(params)
    g = {k: torch.full_like(v, 0.25) for k, v in params.items()}
    params, state = opt.step(params, g, state)
    return opt, params, state


@pytest.mark.parametrize("rec", RECORDS, ids=REC_IDS)
def test_sparse_torch_gradients_raise_a_named_type_error_and_write_nothing(rec):
    require("torch")
    import torch

    opt, params, state = _torch_setup(rec)
    before = snapshot((params, state))
    emb = torch.nn.Embedding(5, 4, sparse=True)
    emb(torch.tensor([1, 3])).sum().backward()
    grads = {"w": emb.weight.grad, "b": torch.ones(4)}
    assert grads["w"].is_sparse
    kw = {"stats": {}} if getattr(opt, "takes_stats", False) else {}  # no statistics: the gradients alone
    for call in (lambda: opt.step(params, grads, state, **kw), lambda: opt.update(grads, state, params, **kw)):
        with pytest.raises(TypeError, match=r"grads leaf \['w'\]: a sparse_coo tensor.*to_dense"):
            call()
        assert snapshot((params, state)) == before
    with pytest.raises(TypeError, match=r"params leaf \['w'\]: a sparse_coo tensor"):
        rec.factory(**rec.configs[0]).init({"w": emb.weight.grad.coalesce(), "b": torch.ones(4)})


@pytest.mark.parametrize("rec", RECORDS, ids=REC_IDS)
def test_meta_device_torch_tensors_raise_a_named_value_error(rec):
    require("torch")
    import torch

    opt = rec.factory(**rec.configs[0])
    with pytest.raises(ValueError, match=r"params leaf \['w'\]: on the meta device"):
        opt.init({"w": torch.empty(5, 4, device="meta"), "b": torch.zeros(4)})
    opt, params, state = _torch_setup(rec)
    before = snapshot((params, state))
    kw = {"stats": {}} if getattr(opt, "takes_stats", False) else {}
    with pytest.raises(ValueError, match=r"grads leaf \['w'\]: on the meta device"):
        opt.step(params, {"w": torch.empty(5, 4, device="meta"), "b": torch.ones(4)}, state, **kw)
    assert snapshot((params, state)) == before


def test_sonew_band_is_bounded_at_construction_with_the_reason():
    from arrayopt.sonew.optimizer import MAX_BAND

    for band in (MAX_BAND + 1, 10 ** 5, 10 ** 9):
        with pytest.raises(ValueError, match=rf"band: must be <= {MAX_BAND}, got {band}; the state keeps"):
            ao.sonew(band=band)
    assert ao.sonew(band=MAX_BAND).band == MAX_BAND


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_sonew_band_wider_than_a_tensor_is_the_dense_band_of_that_tensor(lib):
    """Pairs ``(i, i + k)`` past the end hold zeros: ``band >= n - 1`` is the full preconditioner."""
    require(lib)
    from _arrays import asarray, to_numpy

    rng = np.random.default_rng(1)
    p0, gs = rng.normal(size=5), [rng.normal(size=5) for _ in range(3)]
    out = []
    for band in (4, 9):
        opt = ao.sonew(0.1, band=band, block_size=None)
        p = {"v": asarray(lib, p0, "float64")}
        s = opt.init(p)
        for g in gs:
            p, s = opt.step(p, {"v": asarray(lib, g, "float64")}, s)
        out.append(to_numpy(p["v"]))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("variant", ["eva", "eva_f", "eva_s"])
def test_eva_with_mixed_float32_and_float64_torch_leaves_steps_or_raises_a_named_error(variant):
    require("torch")
    import torch

    opt = ao.eva(0.1, variant=variant)
    params = {"w": torch.ones(4, 3, dtype=torch.float32), "b": torch.ones(4, dtype=torch.float32),
              "v": torch.ones(2, 3, dtype=torch.float64)}
    state = opt.init(params)
    grads = {k: torch.full_like(x, 0.5) for k, x in params.items()}
    stats = None if variant == "eva_s" else {
        "w": {"input": torch.ones(5, 3, dtype=torch.float64), "output_grad": torch.ones(5, 4), "bias": "b"},
        "v": {"a": torch.ones(3, dtype=torch.float32), "g": torch.ones(2, dtype=torch.float32)}}
    for _ in range(2):
        try:
            params, state = opt.step(params, grads, state, stats=stats)
        except (TypeError, ValueError) as e:
            assert "stats" in str(e) or "leaf" in str(e), e
            return
    assert params["w"].dtype == torch.float32 and params["v"].dtype == torch.float64
    assert all(bool(torch.isfinite(x).all()) for x in params.values())
