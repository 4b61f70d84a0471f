"""The CUDA backend (``arrayopt.backends.cupy_cuda``), tested with and without a GPU.

Without a GPU (``backends/cupy_cuda/README.md``):

- every ``.cu`` file compiles with ``nvcc -arch=sm_90 --cubin`` and the options CuPy uses,
  with every kernel its op module loads instantiated for float and double; the PTX has only
  IEEE ``.rn`` float arithmetic (no FMA, no flush-to-zero);
- the same source built for the host (``-DARRAYOPT_HOST_HARNESS``) matches each optimizer's
  ``reference()`` on random inputs (hypothesis), with the scalars of ``step_scalars`` packed
  exactly as the backend packs them for CuPy;
- the backend's Python code runs end to end on a fake ``cupy`` whose kernels are the host
  harness.

With a CUDA device and CuPy: ``opt.step`` on CuPy arrays and torch CUDA tensors against
the NumPy reference (skipped here: "needs a CUDA device and cupy").
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import arrayopt as ao
from arrayopt import _tree, dispatch
from arrayopt._xp import Namespace, resolve
from arrayopt.backends import cupy_cuda
from arrayopt.backends.cupy_cuda import _loader, first_order

try:
    from . import _cuda_host_harness as hh
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import _cuda_host_harness as hh

FLOATS = [np.float32, np.float64]
# the op table: op -> OpEntry(module, capabilities); every op module's kernels are one KernelFile
TABLE = cupy_cuda.CupyCUDA.table
KERNEL_FILES = {entry.module.KERNELS.path: entry.module.KERNELS for entry in TABLE.values()}
KINDS = ["sgd", "sgd_momentum", "sgd_nesterov", "adam", "adamw", "adagrad"]
needs_nvcc = pytest.mark.skipif(hh.nvcc() is None, reason="nvcc is not on PATH")
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- helpers


def make_opt(kind: str, hp: dict):
    lr, wd = hp["lr"], hp["wd"]
    if kind == "sgd":
        return ao.sgd(lr, weight_decay=wd)
    if kind in ("sgd_momentum", "sgd_nesterov"):
        return ao.sgd(lr, momentum=hp["mu"], nesterov=kind == "sgd_nesterov", weight_decay=wd)
    if kind == "adam":
        return ao.adam(lr, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=wd)
    if kind == "adamw":
        return ao.adamw(lr, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=wd)
    if kind == "adagrad":
        return ao.adagrad(lr, eps=hp["eps"], initial_accumulator_value=hp["init"], weight_decay=wd)
    raise AssertionError(kind)


HYPER = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 1.0),
    "wd": st.one_of(st.just(0.0), st.floats(1e-4, 0.5)),
    "mu": st.floats(0.01, 0.99),
    "b1": st.floats(0.0, 0.99),
    "b2": st.floats(0.5, 0.9999),
    "eps": st.one_of(st.just(1e-8), st.floats(1e-10, 1e-2)),
    "init": st.one_of(st.just(0.0), st.floats(1e-3, 1.0)),
    "t": st.integers(1, 5000),
})

DEFAULT_HP = dict(lr=0.05, wd=0.01, mu=0.9, b1=0.9, b2=0.999, eps=1e-8, init=0.1, t=1)


def random_state(opt, p_shape, dtype, rng, scale=1.0):
    """Plausible optimizer state: momentum/first moment signed, second moments >= 0."""
    out = []
    for name in opt.state_names:
        x = rng.standard_normal(p_shape) * scale
        if name in ("nu", "sum"):
            x = np.abs(x) * scale
        out.append(x.astype(dtype))
    return out


def reference_step(opt, p, g, states, scalars):
    with np.errstate(all="ignore"):
        p_new, new_states = opt.reference(np, p.copy(), g.copy(), [s.copy() for s in states],
                                          scalars)
    return np.asarray(p_new), [np.asarray(s) for s in new_states]


def assert_parity(actual, expected, dtype):
    """Within rtol (f32 1e-6, f64 1e-12); in fact bit for bit: the kernels do the
    reference's IEEE operations in the reference's order. NaN matches NaN."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype == np.dtype(dtype)
    rtol = 1e-6 if np.dtype(dtype) == np.float32 else 1e-12
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0, equal_nan=True)
    np.testing.assert_array_equal(actual, expected)


# ---------------------------------------------------------------- nvcc: cubin and PTX


@needs_nvcc
@pytest.mark.parametrize("src", hh.cu_files(), ids=lambda p: p.name)
def test_cu_compiles_to_sm90_cubin(src, tmp_path):
    options = _loader.COMPILE_OPTIONS + _loader.CUPY_ADDED_OPTIONS
    proc, cubin, ptx = hh.compile_cubin(src, tmp_path, options)
    assert proc.returncode == 0, f"nvcc failed on {src.name}:\n{proc.stderr}"
    assert cubin.is_file() and cubin.stat().st_size > 0
    # every kernel CuPy will look up is instantiated for float and double
    data = cubin.read_bytes()
    for base in KERNEL_FILES[src].bases:
        for code in "fd":
            mangled = f"{len(base)}{base}I{code}E".encode()
            assert mangled in data, f"{base}<{code}> missing from the cubin"
    assert ptx is not None, "nvcc --keep left no PTX"
    assert_ieee_ptx(ptx.read_text())


def assert_ieee_ptx(text: str) -> None:
    """Under CuPy's -ftz=true, float arithmetic is still IEEE: explicit .rn, no .ftz, no FMA."""
    arith = re.findall(r"^\s*((?:add|sub|mul|div|sqrt|fma|mad)(?:\.\w+)*\.f(?:32|64))\s",
                       text, flags=re.M)
    assert arith, "no float arithmetic found in the PTX"
    bad = sorted({op for op in arith
                  if op.startswith(("fma", "mad")) or ".ftz" in op or ".rn." not in op + "."})
    assert not bad, f"non-IEEE float instructions in the PTX: {bad}"


def test_nvrtc_compiles_like_cupy():
    """NVRTC (CuPy's compiler) takes the source with CuPy's options and name expressions."""
    lib = hh.find_nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or set "
                    "ARRAYOPT_NVRTC_PATH / ARRAYOPT_NVRTC_LIB)")
    options = _loader.COMPILE_OPTIONS + _loader.CUPY_ADDED_OPTIONS + ("-arch=compute_90",)
    ptx, lowered, log = hh.nvrtc_compile(lib, _loader.source_text(first_order.KERNELS.path), options,
                                         first_order.KERNELS.name_expressions)
    assert "warning" not in log.lower(), log
    assert set(lowered) == set(first_order.KERNELS.name_expressions)
    for expression, mangled in lowered.items():
        assert re.search(rf"\.entry\s+{re.escape(mangled)}\(", ptx), expression
    assert_ieee_ptx(ptx)


# ---------------------------------------------------------------- host harness


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    if hh.nvcc() is None:
        pytest.skip("nvcc is not on PATH")
    return hh.shared_harness(first_order.KERNELS.path, tmp_path_factory)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(hp=HYPER, n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       p_exp=st.integers(-4, 4), g_exp=st.integers(-4, 4), special=st.booleans())
def test_host_kernel_matches_reference(harness, kind, dtype, hp, n, seed, p_exp, g_exp, special):
    opt = make_opt(kind, hp)
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal(n) * 10.0 ** p_exp).astype(dtype)
    g = (rng.standard_normal(n) * 10.0 ** g_exp).astype(dtype)
    states = random_state(opt, n, dtype, rng, 10.0 ** g_exp)
    if special:  # NaN/Inf propagate, subnormals and signed zeros are not flushed
        tiny = np.finfo(dtype).smallest_subnormal
        values = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, tiny, -3 * tiny], dtype)
        for arr in (p, g):
            idx = rng.integers(0, n, size=min(n, 3))
            arr[idx] = rng.choice(values, size=idx.size)
    scalars = opt.step_scalars(hp["t"], hp["lr"])
    p_ref, s_ref = reference_step(opt, p, g, states, scalars)

    base = first_order.kernel_base(opt.kernel_op, len(opt.state_names))
    p_h, g_h, s_h = p.copy(), g.copy(), [s.copy() for s in states]
    harness.launch(base, dtype, first_order.kernel_args(p_h, g_h, s_h, scalars))

    assert_parity(p_h, p_ref, dtype)
    for a, b in zip(s_h, s_ref):
        assert_parity(a, b, dtype)
    np.testing.assert_array_equal(g_h, g)  # grads are read only


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@SETTINGS
@given(data=st.data())
def test_host_count_nonfinite_matches_numpy(harness, dtype, data):
    width = 32 if dtype == np.float32 else 64
    x = data.draw(hnp.arrays(dtype, st.integers(0, 300), elements=st.floats(width=width)))
    expected = int(np.count_nonzero(~np.isfinite(x)))
    assert harness.count_nonfinite(x) == expected
    # the counter accumulates, so several leaves share one counter and one read
    counter = np.full(1, 7, np.uint64)
    harness.launch("count_nonfinite", dtype, first_order.count_args(x, counter))
    harness.launch("count_nonfinite", dtype, first_order.count_args(x, counter))
    assert int(counter[0]) == 7 + 2 * expected


def test_host_kernel_sgd_nesterov_flag_is_honoured(harness):
    p = np.ones(4, np.float32)
    g = np.full(4, 0.5, np.float32)
    results = {}
    for nesterov in (False, True):
        opt = ao.sgd(0.1, momentum=0.9, nesterov=nesterov)
        buf = [np.full(4, 2.0, np.float32)]
        p_h = p.copy()
        harness.launch("sgd_momentum_step", np.float32,
                       first_order.kernel_args(p_h, g, buf, opt.step_scalars(1, 0.1)))
        results[nesterov] = p_h[0]
    # buf = 2*0.9 + 0.5 = 2.3; heavy ball: 1 - 0.1*2.3; Nesterov: 1 - 0.1*(0.5 + 0.9*2.3)
    assert results[False] == np.float32(1) - np.float32(0.1) * np.float32(2.3)
    assert results[True] != results[False]


# ---------------------------------------------------------------- kernel table and typing


def test_kernel_table_covers_every_optimizer():
    src = first_order.KERNELS.path.read_text()
    for opt in (ao.sgd(0.1), ao.sgd(0.1, momentum=0.9), ao.adam(), ao.adamw(), ao.adagrad()):
        assert TABLE[opt.kernel_op].module is first_order
        base = first_order.kernel_base(opt.kernel_op, len(opt.state_names))
        assert re.search(rf"__global__ void {base}\(", src), base
    assert re.search(rf"__global__ void {first_order.COUNT_KERNEL}\(", src)
    with pytest.raises(ValueError, match="no kernel"):
        first_order.kernel_base("adam", 1)
    for kernels in KERNEL_FILES.values():
        assert set(kernels.name_expressions) == {
            f"arrayopt::{b}<{t}>" for b in kernels.bases for t in ("float", "double")}
    with pytest.raises(TypeError):
        _loader.kernel_name("adam_step", np.float16)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_kernel_args_are_typed(dtype):
    p, g, s = np.zeros(5, dtype), np.zeros(5, dtype), np.zeros(5, dtype)
    args = first_order.kernel_args(p, g, [s], ao.sgd(0.1, momentum=0.5, nesterov=True).step_scalars(1, 0.1))
    assert args[:3] == (p, g, s)
    assert type(args[3]) is np.int64 and args[3] == 5
    assert [type(a) for a in args[4:]] == [np.dtype(dtype).type] * 3 + [np.int32]
    assert args[-1] == 1
    args = first_order.kernel_args(p, g, [s, s], ao.adam().step_scalars(3, 1e-3))
    assert [type(a) for a in args[5:]] == [np.dtype(dtype).type] * 8


# ---------------------------------------------------------------- availability (no GPU needed)


def test_backend_is_registered_and_has_the_interface():
    b = cupy_cuda.BACKEND
    assert b.name == "cupy_cuda" and b.ops == frozenset(TABLE) and b.ops
    assert isinstance(b, dispatch.Backend)
    assert any(x is b for x in dispatch.backends())
    for method in ("available", "reason", "accepts", "views", "all_finite", "run"):
        assert callable(getattr(b, method))


def test_importing_the_backend_imports_neither_cupy_nor_torch():
    code = ("import sys, arrayopt.backends.cupy_cuda as m; "
            "assert m.BACKEND.name == 'cupy_cuda'; "
            "print(sorted({'cupy', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=hh.ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_available_never_raises():
    b = cupy_cuda.CupyCUDA()
    ok = b.available()
    assert isinstance(ok, bool) and isinstance(b.reason(), str) and b.reason()
    assert ao.dispatch.status()["cupy_cuda"][0] == cupy_cuda.BACKEND.available()
    if importlib.util.find_spec("cupy") is None:
        assert ok is False and "cupy is not installed" in b.reason()
        assert "cupy_cuda" not in ao.dispatch.available()


def _fake_module(count):
    import types

    def get_count():
        if isinstance(count, Exception):
            raise count
        return count

    cp = types.ModuleType("cupy")
    cp.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count))
    return cp


@pytest.mark.parametrize("count, why", [
    (RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"), "no CUDA device"),
    (0, "no CUDA device"),
])
def test_available_false_without_device(monkeypatch, count, why):
    monkeypatch.setitem(sys.modules, "cupy", _fake_module(count))
    b = cupy_cuda.CupyCUDA()
    assert b.available() is False and why in b.reason()
    ns = Namespace(np, "cpu", "cupy")
    assert b.accepts(ns, [np.zeros(2, np.float32)]) is False


def test_available_false_when_cupy_does_not_import(monkeypatch):
    """cupy is found but its import fails (a broken install, missing CUDA libraries): the
    import itself is made to fail, so this holds whether or not cupy is installed."""
    import builtins

    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    real_find_spec, real_import = importlib.util.find_spec, builtins.__import__
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "cupy" else real_find_spec(name, *a))

    def failing_import(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise OSError("libcudart.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    b = cupy_cuda.CupyCUDA()
    assert b.available() is False and "does not import" in b.reason()
    assert "OSError" in b.reason() and "libcudart" in b.reason()
    monkeypatch.undo()

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    b = cupy_cuda.CupyCUDA()
    assert b.available() is False and "cupy is not installed" in b.reason()


def test_numpy_arrays_never_go_to_cuda():
    params = {"w": np.ones(4, np.float32)}
    grads = {"w": np.full(4, 0.5, np.float32)}
    opt = ao.adam(0.1)
    ns = resolve(params["w"])
    assert cupy_cuda.BACKEND.accepts(ns, [params["w"]], [grads["w"]]) is False
    with dispatch.use_backend("cupy_cuda"):  # falls back to the reference
        new, state = opt.step({"w": params["w"].copy()}, grads, opt.init(params))
    with dispatch.use_backend("reference"):
        ref, _ = opt.step({"w": params["w"].copy()}, grads, opt.init(params))
    np.testing.assert_array_equal(new["w"], ref["w"])


# ---------------------------------------------------------------- emulated device (fake cupy)


@pytest.fixture
def emulated(harness, monkeypatch):
    """A fresh backend whose ``cupy`` is the fake one of ``_cuda_host_harness``."""
    launches = []
    monkeypatch.setitem(sys.modules, "cupy", hh.fake_cupy(harness, launches))
    hh.fresh_loader(monkeypatch)
    return cupy_cuda.CupyCUDA(), launches


def test_emulated_accepts(emulated):
    backend, _ = emulated
    f = hh.as_fake
    ns = Namespace(np, "cuda:0", "cupy")
    p = [f(np.zeros((3, 2), np.float32)), f(np.zeros(4, np.float64))]
    g = [f(np.zeros((3, 2), np.float32)), f(np.zeros(4, np.float64))]
    assert backend.accepts(ns, p, g, [f(np.zeros((3, 2), np.float32)), f(np.zeros(4))])
    assert not backend.accepts(Namespace(np, "cpu", "numpy"), p, g)
    assert not backend.accepts(ns, p, [g[0], f(np.zeros(4, np.float32))])  # dtype mismatch
    assert not backend.accepts(ns, p, g[:1])  # length mismatch
    assert not backend.accepts(ns, [f(np.zeros(4, np.float16))], [f(np.zeros(4, np.float16))])
    assert not backend.accepts(ns, [f(np.zeros((4, 4), np.float32)).T],
                               [f(np.zeros((4, 4), np.float32))])
    assert not backend.accepts(ns, [np.zeros(4, np.float32)], [np.zeros(4, np.float32)])
    assert not backend.accepts(ns, [])


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", KINDS)
def test_emulated_step_matches_reference(emulated, kind, dtype):
    """What ``ElementwiseOptimizer._step`` does with a backend, on the fake device."""
    backend, launches = emulated
    opt = make_opt(kind, DEFAULT_HP)
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (0,), (1,), (300,)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    states = {n: [np.full(s, opt.init_value(n), dtype) for s in shapes] for n in opt.state_names}
    ref_p = [p.copy() for p in params]
    ref_s = {n: [a.copy() for a in v] for n, v in states.items()}
    dev_p = [hh.as_fake(p) for p in params]
    dev_s = [[hh.as_fake(a) for a in states[n]] for n in opt.state_names]
    for t in (1, 2, 3):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        dev_g = [hh.as_fake(g.copy()) for g in grads]
        scalars = opt.step_scalars(t, DEFAULT_HP["lr"])
        views = backend.views(dev_g)
        assert backend.all_finite(views)
        backend.run(opt.kernel_op, dev_p, dev_g, dev_s, scalars, g_views=views)
        for i in range(len(shapes)):
            p_new, s_new = reference_step(opt, ref_p[i], grads[i],
                                          [ref_s[n][i] for n in opt.state_names], scalars)
            ref_p[i] = p_new
            for n, a in zip(opt.state_names, s_new):
                ref_s[n][i] = a
    for i in range(len(shapes)):
        assert_parity(dev_p[i].view(np.ndarray), ref_p[i], dtype)
        for j, n in enumerate(opt.state_names):
            assert_parity(dev_s[j][i].view(np.ndarray), ref_s[n][i], dtype)
    ctype = "float" if dtype == np.float32 else "double"
    base = first_order.kernel_base(opt.kernel_op, len(opt.state_names))
    steps = [e for e, _, _ in launches if not e.startswith("arrayopt::count_nonfinite")]
    counts = [e for e, _, _ in launches if e.startswith("arrayopt::count_nonfinite")]
    assert steps == [f"arrayopt::{base}<{ctype}>"] * (3 * 3)  # the empty leaf is skipped
    assert counts == [f"arrayopt::count_nonfinite<{ctype}>"] * (3 * 3)


def test_emulated_all_finite(emulated):
    backend, launches = emulated
    f = hh.as_fake
    leaves = [f(np.ones(5, np.float32)), f(np.zeros(0, np.float32)), f(np.ones(7, np.float64))]
    assert backend.all_finite(backend.views(leaves))
    leaves[2][3] = np.nan
    assert not backend.all_finite(backend.views(leaves))
    leaves[2][3] = 1.0
    leaves[0][0] = -np.inf
    assert not backend.all_finite(backend.views(leaves))
    assert backend.all_finite(backend.views([]))
    assert backend.all_finite(backend.views([f(np.zeros(0, np.float32))]))


# ---------------------------------------------------------------- on a CUDA device

needs_cuda = pytest.mark.skipif(not cupy_cuda.BACKEND.available(),
                                reason="needs a CUDA device and cupy")


def _leaves(tree):
    return _tree.flatten(tree)[0]


def _assert_selected(opt, params, grads, state):
    leaves = _leaves(params)
    chosen = dispatch.select(opt.kernel_op, resolve(leaves[0]), leaves, _leaves(grads),
                             *[state[n] for n in opt.state_names])
    assert chosen is cupy_cuda.BACKEND


def _assert_same_state(opt, state, ref_state, to_numpy, dtype):
    assert state["count"] == ref_state["count"]
    for n in opt.state_names:
        for a, b in zip(state[n], ref_state[n]):
            assert_parity(to_numpy(a), b, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", KINDS)
def test_cupy_step_matches_reference(kind, dtype):
    import cupy

    opt = make_opt(kind, DEFAULT_HP)
    rng = np.random.default_rng(1)
    host = {"w": rng.standard_normal((17, 33)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    params = {k: cupy.asarray(v) for k, v in host.items()}
    state, ref_state = opt.init(params), opt.init(host)
    ref = {k: v.copy() for k, v in host.items()}
    for _ in range(3):
        g = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in host.items()}
        g_dev = {k: cupy.asarray(v) for k, v in g.items()}
        _assert_selected(opt, params, g_dev, state)
        out, state = opt.step(params, g_dev, state)
        assert all(out[k] is params[k] for k in params)  # in place
        with dispatch.use_backend("reference"):
            ref, ref_state = opt.step(ref, g, ref_state)
    for k in host:
        assert_parity(cupy.asnumpy(params[k]), ref[k], dtype)
    _assert_same_state(opt, state, ref_state, cupy.asnumpy, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["sgd", "adam", "adagrad"])
def test_cupy_float32_subnormals_are_not_flushed(kind):
    import cupy

    opt = make_opt(kind, dict(DEFAULT_HP, lr=1e-3, wd=0.0))
    tiny = np.finfo(np.float32).smallest_subnormal
    p = (np.arange(1, 65, dtype=np.float32) * tiny * 1000).astype(np.float32)
    g = (np.arange(1, 65, dtype=np.float32) * tiny).astype(np.float32)
    params, ref = {"p": cupy.asarray(p)}, {"p": p.copy()}
    state, ref_state = opt.init(params), opt.init(ref)
    params, state = opt.step(params, {"p": cupy.asarray(g)}, state)
    with dispatch.use_backend("reference"):
        ref, ref_state = opt.step(ref, {"p": g}, ref_state)
    assert_parity(cupy.asnumpy(params["p"]), ref["p"], np.float32)


@pytest.mark.gpu
@needs_cuda
def test_cupy_large_array_uses_grid_stride():
    import cupy

    n = 4 * _loader.max_blocks(0) * _loader.BLOCK + 3  # several elements per thread
    rng = np.random.default_rng(2)
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    opt = ao.sgd(0.1, weight_decay=0.01)
    params = {"p": cupy.asarray(p)}
    params, _ = opt.step(params, {"p": cupy.asarray(g)}, opt.init(params))
    with dispatch.use_backend("reference"):
        ref, _ = opt.step({"p": p.copy()}, {"p": g}, opt.init({"p": p}))
    assert_parity(cupy.asnumpy(params["p"]), ref["p"], np.float32)


@pytest.mark.gpu
@needs_cuda
def test_cupy_nonfinite_raises_or_skips():
    import cupy

    params = {"w": cupy.ones(8, dtype=cupy.float32)}
    g = cupy.full(8, 0.5, dtype=cupy.float32)
    g[5] = cupy.nan
    opt = ao.adam(0.1)
    state = opt.init(params)
    with pytest.raises(ValueError):
        opt.step(params, {"w": g}, state)
    np.testing.assert_array_equal(cupy.asnumpy(params["w"]), np.ones(8, np.float32))
    np.testing.assert_array_equal(cupy.asnumpy(state["mu"][0]), np.zeros(8, np.float32))
    skip = ao.adam(0.1, on_nonfinite="skip")
    params, state = skip.step(params, {"w": g}, skip.init(params))
    assert state["nonfinite_skipped"] == 1 and state["count"] == 0
    np.testing.assert_array_equal(cupy.asnumpy(params["w"]), np.ones(8, np.float32))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_cuda_step_matches_reference(dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device and cupy (torch sees no CUDA device)")
    tdtype = getattr(torch, dtype)
    rng = np.random.default_rng(3)
    host = {"w": rng.standard_normal((8, 9)).astype(dtype), "b": rng.standard_normal(3).astype(dtype)}
    params = {k: torch.nn.Parameter(torch.tensor(v, device="cuda")) for k, v in host.items()}
    opt = ao.adamw(1e-2, weight_decay=0.1)
    state, ref_state = opt.init(params), opt.init(host)
    ref = {k: v.copy() for k, v in host.items()}
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # kernels must follow torch's current stream
        for _ in range(3):
            g = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in host.items()}
            g_dev = {k: torch.tensor(v, device="cuda", dtype=tdtype) for k, v in g.items()}
            _assert_selected(opt, params, g_dev, state)
            out, state = opt.step(params, g_dev, state)
            assert all(out[k] is params[k] for k in params)  # in place, same Parameters
            with dispatch.use_backend("reference"):
                ref, ref_state = opt.step(ref, g, ref_state)
    torch.cuda.synchronize()
    for k in host:
        assert_parity(params[k].detach().cpu().numpy(), ref[k], dtype)
    _assert_same_state(opt, state, ref_state, lambda t: t.detach().cpu().numpy(), dtype)
