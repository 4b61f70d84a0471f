"""The framework adapters' cost per step, as ratios measured in ONE process.

- ``torch_adapter/ao_step``: ``arrayopt.interop.torch.Optimizer(..., ao.adam()).step()``
  over ``ao.adam().step`` called directly on the same torch CPU tensors (the adapter's
  own cost: collecting the params with gradients, detaching, the group's rate).
- ``torch_adapter/torch_fused_adam``: the adapter over ``torch.optim.Adam(fused=True)``.
- ``optax_transform/optax_adam``: a ``jax.jit``-ed step of
  ``arrayopt.interop.optax.transform(ao.adam())`` (the update traced into the step as
  JAX code, no host callback) over the jitted ``optax.adam`` step.

Params: a 4-tensor model of ``n`` float32 params in all (weights ``(k, k)`` twice and
two biases). Contenders interleaved round-robin (``common.interleaved``), medians.
``python asv_bench/scripts/interop_ratios.py`` prints them as a markdown table.
"""

from __future__ import annotations

import numpy as np

from .common import LR, ao, interleaved, medians_ms

SIZES = {"1M": 1_000_000, "10M": 10_000_000}
RATIOS = {
    "torch_adapter/ao_step": ("torch_adapter", "ao_step"),
    "torch_adapter/torch_fused_adam": ("torch_adapter", "torch_fused_adam"),
    "optax_transform/optax_adam": ("optax_transform", "optax_adam"),
}


def _shapes(n: int) -> list:
    k = int((n / 2) ** 0.5)
    return [(k, k), (k,), (k, k), (k,)]


def _torch_contenders(n: int) -> dict:
    import torch

    from arrayopt.interop.torch import Optimizer

    rng = np.random.default_rng(0)
    out = {}
    for name in ("torch_adapter", "ao_step", "torch_fused_adam"):
        params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s, np.float32))) for s in _shapes(n)]
        for p in params:
            p.grad = torch.from_numpy(rng.standard_normal(p.shape, np.float32) * 1e-3)
        if name == "torch_adapter":
            out[name] = Optimizer(params, ao.adam(LR)).step
        elif name == "ao_step":
            out[name] = _DirectStep(params)
        else:
            out[name] = torch.optim.Adam(params, lr=LR, fused=True).step
    return out


class _DirectStep:
    def __init__(self, params):
        self.params = [p.detach() for p in params]
        self.grads = [p.grad for p in params]
        self.opt = ao.adam(LR)
        self.state = self.opt.init(self.params)

    def __call__(self):
        self.params, self.state = self.opt.step(self.params, self.grads, self.state)


def _optax_contenders(n: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from arrayopt.interop.optax import transform

    rng = np.random.default_rng(1)
    params = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in _shapes(n)]
    grads = [jnp.asarray(rng.standard_normal(s, np.float32) * 1e-3) for s in _shapes(n)]
    out = {}
    for name, tx in (("optax_transform", transform(ao.adam(LR))), ("optax_adam", optax.adam(LR))):
        step = jax.jit(lambda p, s, tx=tx: _apply(tx, p, s, grads))
        box = [params, tx.init(params)]

        def run(step=step, box=box):
            box[0], box[1] = step(box[0], box[1])
            jax.block_until_ready(box[0])

        out[name] = run
    return out


def _apply(tx, params, state, grads):
    import optax

    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def measure_interop(n: int, rounds: int = 9, steps: int = 3) -> dict:
    """``{"n", "ms", "ratios", "skipped"}`` for ``n`` params; contenders whose framework is
    missing are left out (named in ``skipped``)."""
    contenders, skipped = {}, {}
    for build, what in ((_torch_contenders, "torch"), (_optax_contenders, "jax/optax")):
        try:
            contenders.update(build(n))
        except ImportError as e:
            skipped[what] = str(e)
    if not contenders:
        raise NotImplementedError(f"no contender could be built: {skipped}")
    for fn in contenders.values():  # compile, allocate state
        fn()
        fn()
    med = medians_ms(interleaved(contenders, rounds, steps))
    ratios = {k: med[a] / med[b] for k, (a, b) in RATIOS.items() if a in med and b in med}
    return {"n": n, "ms": med, "ratios": ratios, "skipped": skipped}


class InteropRatios:
    """Adapter ratios (see the module docstring), measured once per environment."""

    params = (list(SIZES), list(RATIOS))
    param_names = ["size", "ratio"]
    timeout = 600
    unit = "ratio"

    def setup_cache(self):
        return {size: measure_interop(n)["ratios"] for size, n in SIZES.items()}

    def track_ratio(self, cache, size, ratio):
        value = cache[size].get(ratio)
        if value is None:
            raise NotImplementedError(f"{ratio}: a framework is missing")
        return value
