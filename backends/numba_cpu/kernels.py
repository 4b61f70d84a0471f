"""Fused Numba kernels for the first-order optimizers.

Each kernel makes one ``prange`` pass over a flat parameter and updates the
parameter and its state in place, with the arithmetic of the reference in
``arrayopt.first_order`` in the same order. Scalars arrive typed (float32
scalars for float32 arrays), so no float64 constant promotes the math. No
``fastmath``: NaN and Inf must propagate exactly as in the reference.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTS = dict(parallel=True, cache=True, nogil=True, boundscheck=False)


@njit(**_OPTS)
def count_nonfinite(x):
    """Number of NaN/Inf entries: read-only pass (``x - x`` is 0 only for finite x)."""
    bad = 0
    for i in prange(x.size):
        if x[i] - x[i] != 0:
            bad += 1
    return bad


@njit(**_OPTS)
def sgd(p, g, lr, mu, wd, nesterov):  # momentum == 0: mu and nesterov are unused
    for i in prange(p.size):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        p[i] = p[i] - lr * gi


@njit(**_OPTS)
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


@njit(**_OPTS)
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


@njit(**_OPTS)
def adagrad(p, g, s, lr, eps, wd):
    for i in prange(p.size):
        gi = g[i]
        if wd != 0:
            gi = gi + wd * p[i]
        si = s[i] + gi * gi
        s[i] = si
        p[i] = p[i] - lr * (gi / (np.sqrt(si) + eps))


def kernel_for(op: str, n_states: int):
    if op == "sgd":
        return sgd_momentum if n_states else sgd
    return {"adam": adam, "adagrad": adagrad}[op]
