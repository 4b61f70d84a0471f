"""Fused Numba kernels for the first-order optimizers.

Each kernel makes one ``prange`` pass over a flat parameter and updates the
parameter and its state in place, with the arithmetic of the reference in
``arrayopt.first_order`` in the same order. Scalars arrive typed (float32
scalars for float32 arrays), so no float64 constant promotes the math. No
``fastmath``: NaN and Inf must propagate exactly as in the reference.

Every kernel is compiled twice from the same source: ``parallel=True`` for
large leaves and serial for leaves under ``SMALL`` elements, where waking the
thread pool costs more than the pass (elementwise math: identical results).

Op ``sgd``/``adam``/``adagrad``: ``step`` is the tuple of the optimizer's ``step_scalars``,
``states`` the state arrays shaped like the params (none for SGD without momentum).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import OPTS, SERIAL, SMALL, renamed

__all__ = ["OPS", "kernel_for", "run"]

#: the first-order ops, every option fused
OPS = {"sgd": {}, "adam": {}, "adagrad": {}}

#: elementwise math does not care about order: a dense permuted leaf (``channels_last``) runs over
#: its storage, provided params, grads and state share its strides
LAYOUT = "storage"


def sgd(p, g, lr, mu, wd, nesterov):  # momentum == 0: mu and nesterov are unused
    for i in prange(p.size):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        p[i] = p[i] - lr * gi


def sgd_momentum(p, g, buf, lr, mu, wd, nesterov):
    for i in prange(p.size):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        b = buf[i] * mu + gi
        buf[i] = b
        if nesterov:
            p[i] = p[i] - lr * (gi + mu * b)
        else:
            p[i] = p[i] - lr * b


def adam(p, g, m, v, step_size, omb1, b2, omb2, bc2_sqrt, eps, l2, decay):
    for i in prange(p.size):
        gi = g[i]
        pi = p[i]
        if l2 != 0:
            gi = gi + l2 * pi
        if decay != 1:
            pi = pi * decay
        mi = m[i] + omb1 * (gi - m[i])
        vi = v[i] * b2 + omb2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = pi - step_size * (mi / (np.sqrt(vi) / bc2_sqrt + eps))


def adagrad(p, g, s, lr, eps, wd):
    for i in prange(p.size):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        si = s[i] + gi * gi
        s[i] = si
        p[i] = p[i] - lr * (gi / (np.sqrt(si) + eps))


_PY = {"sgd": sgd, "sgd_momentum": sgd_momentum, "adam": adam, "adagrad": adagrad}
_PARALLEL_KERNELS = {k: njit(**OPTS)(renamed(f, "_parallel")) for k, f in _PY.items()}
_SERIAL_KERNELS = {k: njit(**SERIAL)(renamed(f, "_serial")) for k, f in _PY.items()}


def kernel_for(op: str, n_states: int, size: int = SMALL):
    """The compiled kernel of ``op`` for a leaf of ``size`` elements (SGD with momentum: ``n_states = 1``)."""
    if op == "sgd" and n_states:
        op = "sgd_momentum"
    return (_SERIAL_KERNELS if size < SMALL else _PARALLEL_KERNELS)[op]


def run(backend, op, params, grads, states, step, g_views=None):
    """The step of ``op`` on every leaf in place; returns ``None``."""
    p_views = backend.storage_views(params)
    g_views = list(g_views) if g_views is not None else backend.views(grads)
    s_views = [backend.storage_views(s) for s in states]
    for i, p in enumerate(params):
        if not (p.is_contiguous() if hasattr(p, "is_contiguous") else p.flags.c_contiguous):
            g_views[i] = backend.storage_views([grads[i]])[0]  # a dense permuted leaf: its storage order
    typed_by_dtype: dict = {}
    for i, (p, g) in enumerate(zip(p_views, g_views)):
        typed = typed_by_dtype.get(p.dtype)
        if typed is None:  # float32 scalars for float32 leaves, float64 for float64
            cast = p.dtype.type
            typed = typed_by_dtype[p.dtype] = tuple(s if isinstance(s, bool) else cast(s) for s in step)
        kernel_for(op, len(states), p.size)(p, g, *[sv[i] for sv in s_views], *typed)
    return None
