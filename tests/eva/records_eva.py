"""Records of Eva, Eva-f and Eva-s: the generic tests run over them, with statistics.

The generic tests call ``opt.step(params, grads, state)``; the optimizers of these records
(:class:`FedEva`) supply ``stats=`` themselves when called without (Eva-s takes none): per weight leaf (2 or
more axes), ``a`` = the mean of ``G`` read as ``(d_out, d_in)`` (in the optimizer's
``weight_layout``) over its rows and ``g`` = the mean over its columns, in the gradient's
namespace. Any deterministic vectors of the right length
exercise the preconditioning path (its oracles are in ``test_eva_linalg.py``).
"""

from __future__ import annotations

import math

from arrayopt import _tree
from arrayopt.eva import Eva
from records import _BAD_LR, OptimizerRecord


def fed_stats(grads, weight_layout="out_in"):
    """Statistics derived from the gradients (read in ``weight_layout``); leaves that are not
    arrays are left to the optimizer to reject."""
    import array_api_compat

    from arrayopt._xp import is_low_precision

    leaves, _, paths = _tree.flatten(grads)
    stats = {}
    for g, path in zip(leaves, paths):
        if not array_api_compat.is_array_api_obj(g) or len(g.shape) < 2 or math.prod(g.shape) == 0:
            continue
        xp = array_api_compat.array_namespace(g)
        if is_low_precision(g.dtype):
            g = xp.astype(g, xp.float32)  # the same statistics as the float32 oracle of bf16 params
        if weight_layout == "out_in":
            g2 = xp.reshape(g, (g.shape[0], -1))
            stats[path] = (xp.mean(g2, axis=0), xp.mean(g2, axis=1))
        else:  # (…, d_in, d_out)
            g2 = xp.reshape(g, (-1, g.shape[-1]))
            stats[path] = (xp.mean(g2, axis=1), xp.mean(g2, axis=0))
    return stats


class FedEva(Eva):
    """:class:`arrayopt.eva.Eva` that feeds itself :func:`fed_stats` when called without ``stats``."""

    def _fed(self, grads, stats):
        return fed_stats(grads, self.weight_layout) if stats is None and self.variant != "eva_s" else stats

    def update(self, grads, state, params=None, *, stats=None):
        return super().update(grads, state, params, stats=self._fed(grads, stats))

    def step(self, params, grads, state, *, stats=None):
        return super().step(params, grads, state, stats=self._fed(grads, stats))


def fed_eva(learning_rate, **kw):
    return FedEva(learning_rate, **kw)


_INVALID = _BAD_LR + (
    ({"variant": "kfac"}, ValueError, "variant: must be one of"),
    ({"damping": 0.0}, ValueError, "damping: must be > 0"),
    ({"momentum": 1.0}, ValueError, "momentum: must be < 1"),
    ({"stat_decay": 1.5}, ValueError, "stat_decay: must be <= 1"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay: must be >= 0"),
    ({"update_every": 0}, ValueError, "update_every: must be >= 1"),
    ({"kl_mode": "trust"}, ValueError, "kl_mode: must be one of"),
    ({"kl_clip": 0.0}, ValueError, "kl_clip: must be > 0"),
    ({"weight_layout": "io"}, ValueError, "weight_layout: must be one of"),
    ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite: must be one of"),
)

_RTOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
_ATOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-3}

# one record, a config per variant: the generic tests are the suite's most expensive
RECORDS = (
    OptimizerRecord(
        "eva", fed_eva,
        configs=(
            {"learning_rate": 0.01, "damping": 0.1, "kl_clip": 0.01},
            {"learning_rate": 0.1, "damping": 0.1, "variant": "eva_f", "kl_mode": "normalize", "stat_decay": 0.5,
             "weight_decay": 1e-4, "nesterov": True, "update_every": 2, "weight_layout": "in_out"},
            {"learning_rate": 0.1, "variant": "eva_s", "damping": 1.0},
        ),
        invalid=_INVALID + (({"variant": "eva_s", "kl_mode": "clip"}, ValueError, "kl_mode: eva_s rescales"),),
        rtol=_RTOL, atol=_ATOL,
        # JAX compiles Eva's step per drawn shape: fixed trees in test_eva_parity.py instead
        namespace_sweep=False,
    ),
)
