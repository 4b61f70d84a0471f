"""``arrayopt.interop.jax.loss_grads_and_stats``: statistics from probes on the layer outputs."""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao

jax = pytest.importorskip("jax", reason="the JAX adapter needs jax")
jnp = jax.numpy


def _loss_fn(params, x, y, capture):
    h = capture("w1", x, x @ params["w1"].T + params["b1"], bias="b1")
    z = jnp.tanh(h)
    out = capture("w2", z, z @ params["w2"].T)
    return jnp.mean((out - y) ** 2)


def test_statistics_are_the_input_means_and_output_gradient_means():
    rng = np.random.default_rng(0)
    p = {"w1": rng.normal(size=(5, 4)), "b1": rng.normal(size=5), "w2": rng.normal(size=(2, 5))}
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 2))
    params = {k: jnp.asarray(v) for k, v in p.items()}
    loss, grads, stats = ao.interop.jax.loss_grads_and_stats(_loss_fn, params, jnp.asarray(x), jnp.asarray(y))
    # the same by hand, float64 NumPy
    h = x @ p["w1"].T + p["b1"]
    z = np.tanh(h)
    out = z @ p["w2"].T
    d_out = 2 * (out - y) / out.size
    d_h = (d_out @ p["w2"]) * (1 - z * z)
    np.testing.assert_allclose(float(loss), np.mean((out - y) ** 2), rtol=1e-12)
    np.testing.assert_allclose(grads["w1"], d_h.T @ x, rtol=1e-10)
    np.testing.assert_allclose(stats["w1"]["a"], np.append(x.mean(0), 1.0), rtol=1e-12)
    np.testing.assert_allclose(stats["w1"]["g"], d_h.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats["w2"]["a"], z.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["w2"]["g"], d_out.mean(0), rtol=1e-10)
    assert stats["w1"]["bias"] == "b1" and "bias" not in stats["w2"]
    assert list(grads) == list(params)  # the params' key order, for the step

    def twice(params, x, y, capture):
        return _loss_fn(params, x, y, capture) + _loss_fn(params, x, y, capture)

    with pytest.raises(ValueError, match="captured twice"):
        ao.interop.jax.loss_grads_and_stats(twice, params, jnp.asarray(x), jnp.asarray(y))
