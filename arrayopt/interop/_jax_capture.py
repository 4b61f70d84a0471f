r"""The loss, the gradients and the Eva statistics of a JAX function, in one backward pass.

The function is written with explicit layer calls and passes each preconditioned layer's
input and output through ``capture``::

    def loss_fn(params, x, y, capture):
        h = capture("w1", x, x @ params["w1"].T + params["b1"], bias="b1")
        out = capture("w2", jnp.tanh(h), jnp.tanh(h) @ params["w2"].T, bias=None)
        return jnp.mean((out - y) ** 2)

    loss, grads, stats = loss_grads_and_stats(loss_fn, params, x, y)
    params, state = opt.step(params, grads, state, stats=stats)

``capture(name, x, y, bias=None, conv=None)`` returns ``y + δ`` with a zero probe ``δ``:
the gradient w.r.t. ``δ`` is the loss gradient w.r.t. the layer output, which
:func:`jax.value_and_grad` returns with the parameter gradients. ``name`` is the weight
leaf's key in ``stats`` (:func:`arrayopt.eva`), ``bias`` the key of its bias leaf (a 1 is
appended to ``ā``), ``conv`` the ``(kernel_size, stride, padding)`` of an NCHW convolution
(``ā`` from :func:`arrayopt.linalg.kv_conv2d`, ``ḡ`` the mean over axes 0, 2, 3); the
vectors do not depend on how a weight is stored: ``y = x Wᵀ`` (``(d_out, d_in, …)``, the
default) or ``y = x @ W`` (Flax, ``ao.eva(..., weight_layout="in_out")``). A name captured
twice (a shared layer) raises.
"""

from __future__ import annotations

from ..eva.math import kv_conv2d, kv_grad, kv_linear

__all__ = ["loss_grads_and_stats"]


def loss_grads_and_stats(fn, params, *args):
    """``(loss, grads, stats)`` of ``fn(params, *args, capture)``; see the module docstring."""
    import jax
    import jax.numpy as jnp

    shapes = {}

    def record_shape(name, x, y, bias=None, conv=None):
        if name in shapes:
            raise ValueError(f"capture: layer {name!r} captured twice in one call; give each call its own name")
        shapes[name] = jax.ShapeDtypeStruct(y.shape, y.dtype)
        return y

    jax.eval_shape(lambda p, *a: fn(p, *a, record_shape), params, *args)
    probes = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    layers = {}

    def run(p, deltas):
        inputs = {}

        def capture(name, x, y, bias=None, conv=None):
            inputs[name] = x
            layers[name] = (bias, conv)
            return y + deltas[name]

        return fn(p, *args, capture), inputs

    (loss, inputs), (grads, dys) = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(params, probes)
    stats = {}
    for name, (bias, conv) in layers.items():
        x, dy = inputs[name], dys[name]
        if conv is None:
            entry = {"a": kv_linear(x, has_bias=bias is not None), "g": kv_grad(dy)}
        else:
            entry = {"a": kv_conv2d(x, *conv, has_bias=bias is not None), "g": kv_grad(dy, (0, 2, 3))}
        if bias is not None:
            entry["bias"] = bias
        stats[name] = entry
    return loss, _in_order_of(grads, params), stats


def _in_order_of(tree, ref):
    """``tree`` with the dict key order of ``ref`` (JAX returns dicts with sorted keys)."""
    if isinstance(ref, dict):
        return {k: _in_order_of(tree[k], ref[k]) for k in ref}
    if isinstance(ref, (list, tuple)):
        return type(ref)(_in_order_of(t, r) for t, r in zip(tree, ref))
    return tree
