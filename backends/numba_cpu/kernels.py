"""Fused Numba kernels for the first-order optimizers.

Each kernel makes one ``prange`` pass over a flat parameter and updates the
parameter and its state in place, with the arithmetic of the reference in
``arrayopt.first_order`` in the same order. Scalars arrive typed (float32
scalars for float32 arrays), so no float64 constant promotes the math. No
``fastmath``: NaN and Inf must propagate exactly as in the reference.

Every kernel is compiled twice from the same source: ``parallel=True`` for
large leaves and serial for leaves under ``SMALL`` elements, where waking the
thread pool costs more than the pass (elementwise math: identical results).
"""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

# error_model="numpy": x/0 gives inf/nan as in the NumPy reference, and no per-division
# zero check blocks vectorization.
_OPTS = dict(parallel=True, cache=True, nogil=True, boundscheck=False, error_model="numpy")
_SERIAL = dict(_OPTS, parallel=False)
SMALL = 1 << 15  # elements; below this a leaf is updated by one thread


def count_nonfinite(x):
    """Number of NaN/Inf entries: read-only pass (``x - x`` is 0 only for finite x)."""
    bad = 0
    for i in prange(x.size):
        if x[i] - x[i] != 0:
            bad += 1
    return bad


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


_PY = {"count_nonfinite": count_nonfinite, "sgd": sgd, "sgd_momentum": sgd_momentum,
       "adam": adam, "adagrad": adagrad}


def _renamed(f, suffix: str):
    """A copy of ``f`` under another qualified name, so that its Numba cache files differ.

    Numba names cache files after the function's qualname and line and does not key them
    on ``parallel=``: two variants of one function would load each other's machine code.
    """
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + suffix
    g.__doc__ = f.__doc__
    return g


_PARALLEL = {k: njit(**_OPTS)(_renamed(f, "_parallel")) for k, f in _PY.items()}
_SERIAL_K = {k: njit(**_SERIAL)(_renamed(f, "_serial")) for k, f in _PY.items()}


def _pick(name: str, size: int):
    return (_SERIAL_K if size < SMALL else _PARALLEL)[name]


def kernel_for(op: str, n_states: int, size: int = SMALL):
    """The compiled kernel of ``op`` for a leaf of ``size`` elements."""
    if op == "sgd" and n_states:
        op = "sgd_momentum"
    return _pick(op, size)


def all_finite(views) -> bool:
    """True when no view holds NaN/Inf (one read-only pass per leaf)."""
    return all(_pick("count_nonfinite", v.size)(v) == 0 for v in views)
