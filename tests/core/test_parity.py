"""Parity of every path with the NumPy reference: backends, namespaces, dtypes (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arrayopt as ao
from _arrays import LIBS, asarray, assert_trees_close, have, to_numpy
from records import RECORDS

shapes = st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple)
trees = st.one_of(
    shapes.map(lambda s: [s]),
    st.lists(shapes, min_size=1, max_size=3),
    st.dictionaries(st.sampled_from(["w", "b", "emb", "head"]), shapes, min_size=1, max_size=3).map(
        lambda d: {k: d[k] for k in d}),
)


def _build(structure, rng, dtype, lib, scale=1.0):
    def leaf(shape):
        return asarray(lib, rng.normal(size=shape) * scale, dtype)

    if isinstance(structure, dict):
        return {k: leaf(s) for k, s in structure.items()}
    return [leaf(s) for s in structure]


def _run(opt, lib, backend, structure, dtype, seed, steps=3):
    rng = np.random.default_rng(seed)
    params = _build(structure, rng, dtype, lib)
    state = opt.init(params)
    with ao.dispatch.use_backend(None if backend == "auto" else backend):
        for _ in range(steps):
            params, state = opt.step(params, _build(structure, rng, dtype, lib), state)
    if lib == "jax":  # every drawn shape compiles anew: free them, or the suite's peak grows by GBs
        from conftest import free_jax_compilations

        free_jax_compilations()
    return params, state


CONTENDERS = [(lib, b) for lib in LIBS for b in ("auto", "reference") if not (lib in ("jax", "array_api_strict") and b == "auto")]


SWEPT = [r for r in RECORDS if r.namespace_sweep]


@pytest.mark.parametrize("rec", SWEPT, ids=[r.name for r in SWEPT])
@given(structure=trees, dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**16),
       config=st.integers(0, 10))
@settings(max_examples=8)  # 8 drawn cases per record: the sweep is the largest block of the suite
def test_every_backend_and_namespace_matches_numpy_reference(rec, structure, dtype, seed, config):
    opt = rec.factory(**rec.configs[config % len(rec.configs)])
    want_p, want_s = _run(opt, "numpy", "reference", structure, dtype, seed)
    rtol, atol = rec.rtol[dtype], rec.atol[dtype]
    for lib, backend in CONTENDERS:
        if not have(lib):
            continue
        got_p, got_s = _run(opt, lib, backend, structure, dtype, seed)
        assert_trees_close(got_p, want_p, rtol, atol, f"params {lib}/{backend}")
        assert_trees_close(_comparable(got_s, dtype), _comparable(want_s, dtype), rtol, atol,
                           f"state {lib}/{backend}")
        if dtype == "float64" and isinstance(want_s, dict) and "roots" in want_s:
            _assert_roots_normwise_close(got_s["roots"], want_s["roots"], f"state {lib}/{backend}")


def _comparable(state, dtype):
    """The state entries that float rounding cannot move past the records' elementwise tolerances.

    Shampoo's inverse roots are not. The ridge is ``ε·λmax`` with ``ε = 1e-6``, while another
    library's LAPACK or summation order moves a factor's small eigenvalues by up to
    ``k·u·λmax`` (``k`` the factor's size), so ``(λ + ε λmax)^(-1/p)`` moves by up to about
    ``k·u/(p ε)`` relative in those directions: several percent in float32 (hypothesis found
    0.7 % on a 6×6 factor, torch against NumPy), about 1e-9 of the root's norm in float64
    (hypothesis found 1.2e-9 on one entry of a 9×9 root, torch's ``eigh`` against NumPy's). The
    factors and the params (where those directions carry tiny steps) are compared elementwise;
    float64 roots normwise (:func:`_assert_roots_normwise_close`).
    """
    if not isinstance(state, dict) or "roots" not in state:
        return state
    return {k: v for k, v in state.items() if k != "roots"}


def _assert_roots_normwise_close(got, want, what, tol=1e-8):
    """Each float64 root within ``tol·‖R‖_F`` of the reference's (far above ``k·u/(p ε)`` ≈ 1e-9)."""
    pairs = [(a, b) for ga, gb in zip(got, want) for ba, bb in zip(ga, gb) for a, b in zip(ba, bb)]
    assert len(pairs) == sum(len(b) for g in want for b in g), f"{what}: roots tree structure differs"
    for a, b in pairs:
        a, b = np.asarray(to_numpy(a), np.float64), np.asarray(to_numpy(b), np.float64)
        assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b), \
            f"{what}: a root differs by {np.linalg.norm(a - b) / np.linalg.norm(b):.2e} of its norm"


def test_contenders_really_run():
    """The parity matrix must include torch and JAX (installed by the test extra)."""
    for lib in ("torch", "jax", "array_api_strict"):
        assert have(lib), f"{lib} missing: the parity tests would not cover it"
    assert "numba_cpu" in ao.backends_available()


FIRST_ORDER = [r for r in RECORDS if r.name in ("sgd", "adam", "adamw", "adagrad")]


@pytest.mark.parametrize("rec", FIRST_ORDER, ids=[r.name for r in FIRST_ORDER])
def test_numba_backend_is_used_for_numpy_and_torch_cpu(rec):
    torch = pytest.importorskip("torch", reason="torch CPU tensors go through the Numba backend")
    from arrayopt._xp import resolve

    opt = rec.factory(**rec.configs[0])
    for p in (np.ones(5, np.float32), torch.ones(5, dtype=torch.float64)):
        state = opt.init([p])
        arrays = [[p], [p]] + [state[n] for n in opt.state_names]
        chosen = ao.dispatch.select(opt.kernel_op, resolve(p), *arrays)
        assert chosen is not None and chosen.name == "numba_cpu"
        with ao.dispatch.use_backend("reference"):
            assert ao.dispatch.select(opt.kernel_op, resolve(p), *arrays) is None
    # what the Numba backend must decline
    ro = np.ones(5, np.float32)
    ro.flags.writeable = False
    for p in (np.ones(5, np.float16), np.ones((4, 4), np.float32)[:, ::2], ro, torch.ones(5, dtype=torch.bfloat16)):
        state = opt.init([p])
        arrays = [[p], [np.ascontiguousarray(p) if isinstance(p, np.ndarray) else p]] + [state[n] for n in opt.state_names]
        assert ao.dispatch.select(opt.kernel_op, resolve(p), *arrays) is None


@pytest.mark.parametrize("rec", RECORDS, ids=[r.name for r in RECORDS])
def test_bfloat16_matches_float32_math_rounded_each_step(rec):
    torch = pytest.importorskip("torch", reason="bfloat16 params need torch")
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (installed with jax) rounds to bfloat16 in NumPy")
    bf16 = ml_dtypes.bfloat16
    opt = rec.factory(**rec.configs[0])
    rng = np.random.default_rng(7)
    p0 = rng.normal(size=(16, 8)).astype(bf16).astype(np.float32)
    grads = [rng.normal(size=(16, 8)).astype(bf16).astype(np.float32) for _ in range(5)]
    # oracle: float32 state and math, params rounded to bfloat16 after every step
    p_ref = {"w": p0.copy()}
    s_ref = opt.init(p_ref)
    with ao.dispatch.use_backend("reference"):
        for g in grads:
            p_ref, s_ref = opt.step(p_ref, {"w": g}, s_ref)
            p_ref = {"w": p_ref["w"].astype(bf16).astype(np.float32)}
    libs = ["torch"] + (["jax"] if have("jax") else [])
    for lib in libs:
        p = {"w": asarray(lib, p0, "bfloat16")}
        s = opt.init(p)
        for g in grads:
            p, s = opt.step(p, {"w": asarray(lib, g, "bfloat16")}, s)
        np.testing.assert_allclose(to_numpy(p["w"]), p_ref["w"], rtol=1e-2, atol=1e-2, err_msg=lib)
        assert_trees_close(s, s_ref, rtol=1e-4, atol=1e-6, what=f"state {lib}")
