"""The model: a deep MLP autoencoder, forward and hand-written backward pass in NumPy.

It is the SONew paper's MNIST autoencoder (784-1000-500-250-30-250-500-1000-784)
scaled to the 64-pixel digits images: by default 64-256-128-64-16-64-128-256-64.

- tanh after every hidden layer **except the code layer** (the narrowest one),
  which is linear, as in the paper's script;
- the output layer gives logits; the loss is the **sigmoid cross-entropy** with
  the pixel values in [0, 1] as targets, **summed over the pixels and averaged
  over the batch** (nats per image, the paper's loss)::

      loss = mean_b sum_j [ softplus(z_bj) - x_bj * z_bj ]

  Its minimum is the entropy of the targets (:func:`target_entropy`, about
  13.7 nats per digits image), not zero, because the pixels are not binary;
- Glorot-uniform weights, zero biases.

Everything runs in the dtype of the params (float32 by default); no operation
promotes to float64. Low-precision params (bfloat16, float16) are stored and
stepped in their dtype, the forward and backward passes run in float32 on the
rounded values, and the gradients are rounded to the params' dtype (mixed
precision with low-precision weights).

>>> import numpy as np
>>> params = init_params(np.random.default_rng(0), sizes=(4, 3, 2, 3, 4))
>>> x = np.full((5, 4), 0.5, np.float32)
>>> value, grads = loss_and_grads(params, x)
>>> sorted(grads) == sorted(params), grads["W1"].dtype
(True, dtype('float32'))
"""

from __future__ import annotations

import numpy as np

__all__ = ["SIZES", "init_params", "forward", "loss", "loss_and_grads", "loss_grads_and_stats", "num_params",
           "target_entropy"]

SIZES = (64, 256, 128, 64, 16, 64, 128, 256, 64)


def _code_layer(sizes) -> int:
    """Index (1-based, as in ``W{i}``) of the layer whose output is the code (linear)."""
    return int(np.argmin(sizes[1:-1])) + 1


def init_params(rng: np.random.Generator, sizes=SIZES, dtype=np.float32) -> dict:
    """Glorot-uniform weights ``W{i}`` of shape (fan_in, fan_out) and zero biases ``b{i}``."""
    if len(sizes) < 3:
        raise ValueError(f"sizes: expected at least one hidden layer, got {tuple(sizes)}")
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        limit = np.sqrt(6.0 / (n_in + n_out))
        params[f"W{i}"] = rng.uniform(-limit, limit, size=(n_in, n_out)).astype(dtype)
        params[f"b{i}"] = np.zeros(n_out, dtype=dtype)
    return params


def num_params(params: dict) -> int:
    return int(sum(p.size for p in params.values()))


def _n_layers(params: dict) -> int:
    return sum(1 for k in params if k.startswith("W"))


def _sizes(params: dict) -> tuple:
    n = _n_layers(params)
    return (params["W1"].shape[0],) + tuple(params[f"W{i}"].shape[1] for i in range(1, n + 1))


def _compute(params: dict) -> dict:
    """The params in their compute dtype: float32 for float16/bfloat16, else as they are."""
    return {k: v.astype(np.float32) if v.dtype.itemsize < 4 else v for k, v in params.items()}


def forward(params: dict, x: np.ndarray):
    """Return the output logits and the activations ``[x, h1, ..., h_{L-1}]`` for backprop."""
    params = _compute(params)
    n = _n_layers(params)
    code = _code_layer(_sizes(params))
    acts = [x]
    h = x
    for i in range(1, n):
        a = h @ params[f"W{i}"]
        a += params[f"b{i}"]
        h = a if i == code else np.tanh(a, out=a)
        acts.append(h)
    z = h @ params[f"W{n}"]
    z += params[f"b{n}"]
    return z, acts


def _softplus(z):
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def _cross_entropy(z, x) -> float:
    """Sigmoid cross-entropy of logits ``z`` against targets ``x``: sum over pixels, mean over rows."""
    per_pixel = _softplus(z) - x * z
    return float(per_pixel.sum(dtype=np.float64)) / x.shape[0]


def target_entropy(x: np.ndarray) -> np.ndarray:
    """Per-row entropy ``sum_j H(x_j)`` of the targets (float64): the lowest possible loss of each row."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(x > 0, x * np.log(x), 0.0) + np.where(x < 1, (1 - x) * np.log1p(-x), 0.0)
    return -h.sum(axis=1)


def loss(params: dict, x: np.ndarray, batch_size: int = 512) -> float:
    """The loss on ``x`` (evaluated in chunks of ``batch_size`` rows)."""
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        z, _ = forward(params, xb)
        total += _cross_entropy(z, xb) * xb.shape[0]
    return total / x.shape[0]


def loss_and_grads(params: dict, x: np.ndarray):
    """Return ``(loss, grads)`` on the batch ``x``; ``grads`` has the keys and dtypes of ``params``."""
    value, grads, _ = _backprop(params, x, with_stats=False)
    return value, grads


def loss_grads_and_stats(params: dict, x: np.ndarray):
    """Return ``(loss, grads, stats)``: ``stats`` maps each ``W{i}`` to its Kronecker vectors for
    :func:`arrayopt.eva` (``weight_layout="in_out"``): ``ā`` the mean layer input with a 1 appended
    (the bias ``b{i}``), ``ḡ`` the mean gradient of the loss w.r.t. the layer output, both taken
    from the backward pass."""
    return _backprop(params, x, with_stats=True)


def _backprop(params: dict, x: np.ndarray, with_stats: bool):
    from arrayopt.linalg import kv_grad, kv_linear

    dtypes = {k: v.dtype for k, v in params.items()}
    params = _compute(params)
    n = _n_layers(params)
    code = _code_layer(_sizes(params))
    z, acts = forward(params, x)
    value = _cross_entropy(z, x)
    # d loss / d z = (sigmoid(z) - x) / batch; sigmoid written with tanh (no overflow)
    dz = np.tanh(z * 0.5)
    dz *= 0.5
    dz += 0.5
    dz -= x
    dz /= x.shape[0]
    grads, stats = {}, {}
    for i in range(n, 0, -1):
        h = acts[i - 1]
        grads[f"W{i}"] = h.T @ dz
        grads[f"b{i}"] = dz.sum(axis=0)
        if with_stats:
            stats[f"W{i}"] = {"a": kv_linear(h, has_bias=True), "g": kv_grad(dz), "bias": f"b{i}"}
        if i > 1:
            dh = dz @ params[f"W{i}"].T
            if i - 1 != code:  # tanh'(a) = 1 - h^2
                dh *= 1 - h * h
            dz = dh
    return value, {k: grads[k].astype(dtypes[k], copy=False) for k in params}, (stats if with_stats else None)
