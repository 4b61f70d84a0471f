"""The Numba backend's finiteness pre-pass against ``np.isfinite``, and its range check against float64
norms: NumPy views and torch tensors
(small ones by address, large ones per view), a NaN/±Inf anywhere, and finite entries whose sum
overflows (the exact count must settle those)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")

SIZES = [0, 1, 5, 31, 1000, (1 << 15) - 1, 1 << 15, 70001]  # around the serial/parallel threshold


def _backend():
    from arrayopt.backends.numba_cpu import BACKEND

    return BACKEND


@st.composite
def leaves(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    sizes = draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arrays = [rng.standard_normal(n).astype(dtype) for n in sizes]
    for _ in range(draw(st.integers(0, 2))):
        k = draw(st.integers(0, len(arrays) - 1))
        if arrays[k].size:
            pos = draw(st.integers(0, arrays[k].size - 1))
            arrays[k][pos] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if draw(st.booleans()):  # finite entries whose sum overflows
        k = draw(st.integers(0, len(arrays) - 1))
        arrays[k][: min(4, arrays[k].size)] = np.finfo(dtype).max
    return arrays


def _expected(arrays):
    return all(bool(np.isfinite(a).all()) for a in arrays)


@settings(max_examples=60, deadline=None)
@given(leaves())
def test_numpy_views(arrays):
    backend = _backend()
    assert backend.all_finite(backend.views(arrays)) == _expected(arrays)


@settings(max_examples=60, deadline=None)
@given(leaves())
def test_torch_tensors(arrays):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    backend = _backend()
    tensors = [torch.from_numpy(a) for a in arrays]
    assert backend.all_finite(backend.views(tensors)) == _expected(arrays)


def test_overflowing_sum_of_finite_entries_is_finite():
    backend = _backend()
    for dtype in (np.float32, np.float64):
        big = np.full(3 * (1 << 15), np.finfo(dtype).max, dtype)
        assert backend.all_finite(backend.views([big, big[:10].copy()]))
        big[-1] = np.nan
        assert not backend.all_finite(backend.views([big]))


@st.composite
def ranged_leaves(draw):
    """Leaves whose ``‖g‖²`` is far inside the range, far above it (one entry ``2^-20·√max``), or
    NaN/Inf: the range check's answer does not depend on rounding."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    sizes = draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arrays = [rng.standard_normal(n).astype(dtype) for n in sizes]
    k = draw(st.integers(0, len(arrays) - 1))
    if arrays[k].size:
        pos = draw(st.integers(0, arrays[k].size - 1))
        arrays[k][pos] = draw(st.sampled_from([1.0, np.nan, np.inf, -np.inf,
                                               float(np.sqrt(np.finfo(dtype).max)) * 2.0 ** -20]))
    return arrays


def _in_range(arrays):
    from arrayopt._overflow import IN_RANGE

    return all(bool(np.isfinite(a).all()) and float(np.sum(a.astype(np.float64) ** 2))
               < float(np.finfo(a.dtype).max) * IN_RANGE for a in arrays)


@settings(max_examples=60, deadline=None)
@given(ranged_leaves(), st.booleans())
def test_range_check_against_float64_norms(arrays, as_torch):
    from arrayopt._overflow import gradients_in_range

    backend = _backend()
    if as_torch:
        torch = pytest.importorskip("torch", reason="torch is not installed")
        arrays_in = [torch.from_numpy(a) for a in arrays]
    else:
        arrays_in = arrays
    assert gradients_in_range(backend.views(arrays_in)) == _in_range(arrays)
