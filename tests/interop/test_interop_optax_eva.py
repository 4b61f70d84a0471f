"""Eva and Eva-f through ``arrayopt.interop.optax.transform``: the statistics as ``update(..., stats=)``."""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao

jax = pytest.importorskip("jax", reason="the optax adapter needs jax")
optax = pytest.importorskip("optax", reason="the optax adapter needs optax (pip install arrayopt[jax])")
jnp = jax.numpy
from arrayopt.interop.jax import loss_grads_and_stats  # noqa: E402
from arrayopt.interop.optax import transform  # noqa: E402


def _params():
    rng = np.random.default_rng(0)
    return {"w1": jnp.asarray(rng.normal(size=(6, 5)) / 3, jnp.float64), "b1": jnp.zeros(5, jnp.float64),
            "w2": jnp.asarray(rng.normal(size=(5, 3)) / 3, jnp.float64)}


def _batches(steps):
    rng = np.random.default_rng(1)
    return [(jnp.asarray(rng.normal(size=(8, 6)), jnp.float64), jnp.asarray(rng.normal(size=(8, 3)), jnp.float64))
            for _ in range(steps)]


def loss_fn(params, x, y, capture):
    h = jnp.tanh(capture("w1", x, x @ params["w1"] + params["b1"], bias="b1"))
    out = capture("w2", h, h @ params["w2"])
    return jnp.mean((out - y) ** 2)


def _host(tree):
    if isinstance(tree, dict):
        return {k: _host(v) for k, v in tree.items()}
    return tree if isinstance(tree, str) else np.array(tree)


@pytest.mark.parametrize("variant", ["eva", "eva_f"])
def test_jitted_eva_with_captured_statistics_equals_the_numpy_path(variant):
    def make():
        return ao.eva(0.1, variant=variant, weight_layout="in_out", weight_decay=1e-3)

    tx = transform(make())
    traces = []

    @jax.jit
    def train_step(params, state, x, y):
        traces.append(1)
        loss, grads, stats = loss_grads_and_stats(loss_fn, params, x, y)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state

    params, state = _params(), tx.init(_params())
    opt = make()
    want = {k: np.array(v) for k, v in _params().items()}
    s = opt.init(want)
    sgd = {k: np.array(v) for k, v in _params().items()}
    plain = ao.sgd(0.1, momentum=0.9, weight_decay=1e-3)
    s_sgd = plain.init(sgd)
    for x, y in _batches(6):
        _, grads, stats = loss_grads_and_stats(loss_fn, {k: jnp.asarray(v) for k, v in want.items()}, x, y)
        u, s = opt.update(_host(grads), s, want, stats=_host(stats))
        want = ao.apply_updates(want, u)
        _, g_sgd, _ = loss_grads_and_stats(loss_fn, {k: jnp.asarray(v) for k, v in sgd.items()}, x, y)
        u, s_sgd = plain.update(_host(g_sgd), s_sgd, sgd)
        sgd = ao.apply_updates(sgd, u)
        params, state = train_step(params, state, x, y)
    assert len(traces) == 1 and int(state.count) == 6
    for k in want:
        np.testing.assert_allclose(np.asarray(params[k]), want[k], rtol=1e-10, atol=1e-12, err_msg=k)
    # the statistics reached the optimizer: the run is not SGD with momentum
    assert max(np.max(np.abs(np.asarray(params[k]) - sgd[k])) for k in sgd) > 1e-3


def test_statistics_pass_through_an_optax_chain():
    tx = optax.chain(optax.clip_by_global_norm(10.0), transform(ao.eva(0.1, weight_layout="in_out")))
    params = _params()
    x, y = _batches(1)[0]

    @jax.jit
    def step(params, state):
        _, grads, stats = loss_grads_and_stats(loss_fn, params, x, y)
        return tx.update(grads, state, params, stats=stats)

    updates, _ = step(params, tx.init(params))
    _, grads, stats = loss_grads_and_stats(loss_fn, params, x, y)
    opt = ao.eva(0.1, weight_layout="in_out")
    want, _ = opt.update(_host(grads), opt.init(_host(params)), _host(params), stats=_host(stats))
    for k in want:
        np.testing.assert_allclose(np.asarray(updates[k]), want[k], rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("variant", ["eva", "eva_f"])
def test_an_update_without_statistics_raises_a_named_error(variant):
    tx = transform(ao.eva(0.1, variant=variant, weight_layout="in_out"))
    params = _params()
    with pytest.raises(ValueError, match=f"stats: {variant} preconditions from per-layer statistics and got none"):
        tx.update(params, tx.init(params), params)
    chained = transform(ao.chain(ao.clip_by_global_norm(1.0), ao.eva(0.1, variant=variant)))
    with pytest.raises(ValueError, match="stats: chain"):
        chained.update(params, chained.init(params), params)


def test_eva_s_steps_without_statistics_and_rejects_them():
    tx = transform(ao.eva(0.01, variant="eva_s"))
    params = _params()
    x, y = _batches(1)[0]
    _, grads, stats = loss_grads_and_stats(loss_fn, params, x, y)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    opt = ao.eva(0.01, variant="eva_s")
    want, _ = opt.update(_host(grads), opt.init(_host(params)), _host(params))
    for k in want:
        np.testing.assert_allclose(np.asarray(updates[k]), want[k], rtol=1e-10, atol=1e-12, err_msg=k)
    with pytest.raises(TypeError, match="stats: eva_s takes no per-layer statistics"):
        tx.update(grads, tx.init(params), params, stats=stats)
    with pytest.raises(TypeError, match="stats: adam takes no per-layer statistics"):
        transform(ao.adam(0.1)).update(grads, transform(ao.adam(0.1)).init(params), params, stats=stats)
