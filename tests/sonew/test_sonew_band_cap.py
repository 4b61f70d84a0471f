"""A band wider than a tensor (or its block) is the band ``span - 1``: equal results, that cost."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import arrayopt as ao
from arrayopt import dispatch
from arrayopt.sonew.step import SONewStep

BACKENDS = ["reference"] + (["auto"] if importlib.util.find_spec("numba") else [])


def _run(opt, backend, shape=(3, 4), steps=3):
    params = {"w": np.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape), "b": np.ones(1)}
    state = opt.init(params)
    with dispatch.use_backend(None if backend == "auto" else backend):
        for t in range(steps):
            g = {"w": np.sin(np.arange(params["w"].size) * (t + 1.0)).reshape(shape), "b": np.full(1, 0.5 + t)}
            params, state = opt.step(params, g, state)
    return params, state


def test_effective_band_is_capped_at_the_span():
    step = SONewStep(lr=0.1, bc1=0.1, bc2=0.1, b1=0.9, b2=0.999, band=1024)
    assert step.effective_band(300) == 299 and step.effective_band(1) == 1
    blocked = SONewStep(lr=0.1, bc1=0.1, bc2=0.1, b1=0.9, b2=0.999, band=1024, block_size=16)
    assert blocked.effective_band(300) == 15 and blocked.effective_band(5) == 4
    assert SONewStep(lr=0.1, bc1=0.1, bc2=0.1, b1=0.9, b2=0.999, band=0).effective_band(300) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wide,narrow,block_size", [(40, 11, None), (40, 4, 5), (9, 4, 5), (3, 2, None)])
def test_a_band_wider_than_the_tensor_equals_the_band_of_the_span(backend, wide, narrow, block_size):
    shape = (3, 4) if narrow != 2 else (3,)
    p_w, s_w = _run(ao.sonew(1e-2, band=wide, block_size=block_size), backend, shape)
    p_n, s_n = _run(ao.sonew(1e-2, band=narrow, block_size=block_size), backend, shape)
    for k in p_w:
        np.testing.assert_array_equal(p_w[k], p_n[k])
    for bw, bn in zip(s_w["band"], s_n["band"]):
        np.testing.assert_array_equal(bw[:, :bn.shape[1]], bn)
        assert not bw[:, bn.shape[1]:].any()  # the pairs beyond the span hold zeros
    for k in ("removed_edges", "fallback_rows"):
        assert [int(x) for x in s_w[k]] == [int(x) for x in s_n[k]]


@pytest.mark.skipif("auto" not in BACKENDS, reason="needs numba")
@pytest.mark.parametrize("block_size", [None, 16384])
def test_the_kernels_run_the_capped_band(monkeypatch, block_size):
    import arrayopt.backends.numba_cpu.sonew as numba_sonew

    widths = []
    for name in ("run_blocks", "step_leaf"):
        real = getattr(numba_sonew, name)
        monkeypatch.setattr(numba_sonew, name,
                            lambda step, p, g, m, band, *a, _real=real: (widths.append(band.shape[1]),
                                                                        _real(step, p, g, m, band, *a))[1])
    _run(ao.sonew(1e-2, band=1024, block_size=block_size), "auto", (3, 4), steps=1)
    assert sorted(widths) == [2, 12]  # "b" (1 entry): band 1; "w" (12 entries): band 11
