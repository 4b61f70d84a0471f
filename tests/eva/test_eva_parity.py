"""Eva, Eva-f and Eva-s on every namespace and backend against the NumPy reference, on fixed trees.

The Eva record leaves the hypothesis sweep of ``test_parity.py`` (JAX compiles Eva's step
anew for every drawn shape); these trees hold what the sweep would draw and Eva treats
apart: a weight with a bias partner, weights without one (3-D, and 4-D as a convolution
kernel), a bias-like vector without statistics and a 0-D leaf; Eva-f reads the weights in the
``"in_out"`` layout.
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao
from _arrays import LIBS, asarray, assert_trees_close, have
from records import RECORDS as ALL_RECORDS
from records_eva import fed_stats

REC = next(r for r in ALL_RECORDS if r.name == "eva")
CONTENDERS = [(lib, b) for lib in LIBS for b in ("auto", "reference")
              if not (lib in ("jax", "array_api_strict") and b == "auto")]
# one XLA compilation costs seconds: JAX runs each variant in one dtype, both dtypes over the three
JAX_DTYPE = ("float64", "float32", "float64")
SHAPES = {"fc": (5, 5), "fc_b": (5,), "seq": (3, 2, 4), "conv": (2, 3, 2, 2), "gain": (4,),
          "t": ()}


def _tree(rng, lib, dtype):
    return {k: asarray(lib, rng.normal(size=s), dtype) for k, s in SHAPES.items()}


def _run(opt, lib, backend, dtype, steps=3):
    rng = np.random.default_rng(11)
    params = _tree(rng, lib, dtype)
    state = opt.init(params)
    with ao.dispatch.use_backend(None if backend == "auto" else backend):
        for _ in range(steps):
            grads = _tree(rng, lib, dtype)
            stats = None
            if opt.variant != "eva_s":
                stats = fed_stats({k: v for k, v in grads.items() if k != "fc"}, opt.weight_layout)
                a, g = fed_stats({"fc": grads["fc"]}, opt.weight_layout)["['fc']"]
                one = a[:1] * 0 + 1
                stats["['fc']"] = {"a": _concat(a, one), "g": g, "bias": "fc_b"}
            params, state = opt.step(params, grads, state, stats=stats)
    return params, state


def _concat(a, one):
    import array_api_compat

    return array_api_compat.array_namespace(a).concat([a, one])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", range(len(REC.configs)), ids=[c.get("variant", "eva") for c in REC.configs])
def test_every_backend_and_namespace_matches_numpy_reference_on_fixed_trees(config, dtype):
    opt = REC.factory(**REC.configs[config])
    want_p, want_s = _run(opt, "numpy", "reference", dtype)
    rtol, atol = REC.rtol[dtype], REC.atol[dtype]
    for lib, backend in CONTENDERS:
        if not have(lib) or (lib == "jax" and dtype != JAX_DTYPE[config]):
            continue
        got_p, got_s = _run(opt, lib, backend, dtype)
        assert_trees_close(got_p, want_p, rtol, atol, f"params {lib}/{backend}")
        assert_trees_close(got_s, want_s, rtol, atol, f"state {lib}/{backend}")
