"""Array libraries the tests run on, with converters from and to NumPy."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

LIBS = ("numpy", "array_api_strict", "torch", "jax")


def have(lib: str) -> bool:
    return lib == "numpy" or importlib.util.find_spec(lib) is not None


def require(lib: str) -> None:
    if not have(lib):
        pytest.skip(f"{lib} is not installed (pip install '.[test]' installs it)")


def asarray(lib: str, a: np.ndarray, dtype: str | None = None):
    """A copy of ``a`` in library ``lib`` with dtype name ``dtype`` (default: ``a``'s dtype)."""
    dtype = dtype or str(a.dtype)
    if lib == "numpy":
        return np.array(a, dtype=dtype)
    if lib == "array_api_strict":
        import array_api_strict as xp

        return xp.asarray(np.array(a, dtype=dtype))
    if lib == "torch":
        import torch

        return torch.tensor(np.array(a, dtype=np.float64)).to(getattr(torch, dtype))
    if lib == "jax":
        import jax.numpy as jnp

        return jnp.asarray(np.array(a, dtype=np.float64), dtype=getattr(jnp, dtype))
    raise ValueError(lib)


def to_numpy(x) -> np.ndarray:
    """float64 NumPy copy of any array (bfloat16 included)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        return x.detach().cpu().double().numpy()
    if mod.startswith("array_api_strict"):
        return np.asarray(x._array, dtype=np.float64)
    if mod.startswith("cupy"):
        return np.asarray(x.get(), dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def tree_map(fn, tree):
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return fn(tree)


def bits(x):
    """Exact bytes of an array (for bit-identity checks), or the scalar itself."""
    if isinstance(x, (int, float, str, bool, type(None))):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        t = x.detach().cpu()
        return (str(t.dtype), tuple(t.shape), bytes(t.contiguous().view(-1).view(__import__("torch").uint8).numpy()))
    if mod.startswith("array_api_strict"):
        a = x._array
    elif mod.startswith("cupy"):
        a = x.get()
    else:
        a = np.asarray(x)
    return (str(a.dtype), a.shape, np.ascontiguousarray(a).tobytes())


def snapshot(tree):
    """A deep, comparable copy of a tree's exact contents."""
    return tree_map(bits, tree)


def _is_leaf_array(x) -> bool:
    return not isinstance(x, (dict, list, tuple, int, float, str, bool, type(None)))


def flat_items(tree, path=""):
    """``[(path, leaf)]`` of a tree of dicts/lists/tuples with array or scalar leaves."""
    if isinstance(tree, dict):
        return [i for k, v in tree.items() for i in flat_items(v, f"{path}[{k!r}]")]
    if isinstance(tree, (list, tuple)):
        return [i for n, v in enumerate(tree) for i in flat_items(v, f"{path}[{n}]")]
    return [(path, tree)]


def assert_trees_close(got, want, rtol, atol, what=""):
    """Same structure; arrays close within tolerance, scalars equal."""
    g, w = flat_items(got), flat_items(want)
    assert [p for p, _ in g] == [p for p, _ in w], f"{what}: tree structure differs"
    for (path, a), (_, b) in zip(g, w):
        if _is_leaf_array(b):
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=rtol, atol=atol, err_msg=f"{what}{path}")
        else:
            assert a == b or (a != a and b != b), f"{what}{path}: {a!r} != {b!r}"


def float_array_dtypes(tree) -> set:
    """Names of the floating dtypes of the arrays in a tree."""
    out = set()
    for _, x in flat_items(tree):
        if _is_leaf_array(x):
            name = str(x.dtype).rsplit(".", 1)[-1]
            if "float" in name:
                out.add(name)
    return out


def step_tree_and_each_leaf_alone(opt, shapes, dtype, seed, steps=3):
    """``(params, alone)``: a tree of leaves of ``shapes`` stepped together by ``opt``, and each
    leaf stepped alone in a tree of its own on the same gradients (NumPy)."""
    rng = np.random.default_rng(seed)
    params = {f"p{i}": rng.normal(size=s).astype(dtype) for i, s in enumerate(shapes)}
    alone = {k: v.copy() for k, v in params.items()}
    state = opt.init(params)
    states = {k: opt.init({k: v}) for k, v in alone.items()}
    for _ in range(steps):
        grads = {k: rng.normal(size=v.shape).astype(dtype) for k, v in params.items()}
        params, state = opt.step(params, grads, state)
        for k in alone:
            one, states[k] = opt.step({k: alone[k]}, {k: grads[k]}, states[k])
            alone[k] = one[k]
    return params, alone
