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
from ._ptrs import NUMPY_DTYPE, address_table, vector

__all__ = ["OPS", "kernel_for", "run", "sgd_leaves"]

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

# ---------------------------------------------------------------- small leaves, one call (``_ptrs.py``)
# ``addrs[j] = (p, g, states...)`` of leaf ``j``; each leaf runs the serial kernel above, unchanged.

_sgd_1 = _SERIAL_KERNELS["sgd"]
_sgd_momentum_1 = _SERIAL_KERNELS["sgd_momentum"]
_adam_1 = _SERIAL_KERNELS["adam"]
_adagrad_1 = _SERIAL_KERNELS["adagrad"]


@njit(**SERIAL)
def sgd_addrs(addrs, sizes, lr, mu, wd, nesterov):
    for j in range(sizes.size):
        n = sizes[j]
        _sgd_1(vector(addrs[j, 0], n, lr), vector(addrs[j, 1], n, lr), lr, mu, wd, nesterov)


@njit(**SERIAL)
def sgd_momentum_addrs(addrs, sizes, lr, mu, wd, nesterov):
    for j in range(sizes.size):
        n = sizes[j]
        _sgd_momentum_1(vector(addrs[j, 0], n, lr), vector(addrs[j, 1], n, lr), vector(addrs[j, 2], n, lr), lr, mu,
                        wd, nesterov)


@njit(**SERIAL)
def adam_addrs(addrs, sizes, step_size, omb1, b2, omb2, bc2_sqrt, eps, l2, decay):
    for j in range(sizes.size):
        n = sizes[j]
        _adam_1(vector(addrs[j, 0], n, eps), vector(addrs[j, 1], n, eps), vector(addrs[j, 2], n, eps),
                vector(addrs[j, 3], n, eps), step_size, omb1, b2, omb2, bc2_sqrt, eps, l2, decay)


@njit(**SERIAL)
def adagrad_addrs(addrs, sizes, lr, eps, wd):
    for j in range(sizes.size):
        n = sizes[j]
        _adagrad_1(vector(addrs[j, 0], n, eps), vector(addrs[j, 1], n, eps), vector(addrs[j, 2], n, eps), lr, eps, wd)


_ADDR_KERNELS = {"sgd": sgd_addrs, "sgd_momentum": sgd_momentum_addrs, "adam": adam_addrs, "adagrad": adagrad_addrs}


def kernel_for(op: str, n_states: int, size: int = SMALL):
    """The compiled kernel of ``op`` for a leaf of ``size`` elements (SGD with momentum: ``n_states = 1``)."""
    if op == "sgd" and n_states:
        op = "sgd_momentum"
    return (_SERIAL_KERNELS if size < SMALL else _PARALLEL_KERNELS)[op]


def run(backend, op, params, grads, states, step, g_views=None):
    """The step of ``op`` on every leaf in place; returns ``None``.

    Torch leaves under ``SMALL`` elements go to one call per dtype by address (``_ptrs.py``), each
    over its storage (params, grads and state share their strides, ``LAYOUT``); the others one
    call each, on their storage views.
    """
    typed_by_dtype: dict = {}

    def typed(dtype):
        t = typed_by_dtype.get(dtype)
        if t is None:  # float32 scalars for float32 leaves, float64 for float64
            cast = dtype.type
            t = typed_by_dtype[dtype] = tuple(s if isinstance(s, bool) else cast(s) for s in step)
        return t

    large = range(len(params))
    if params and hasattr(params[0], "data_ptr"):  # torch
        import torch

        data_ptr = torch.Tensor.data_ptr
        rows_by_dtype: dict = {}
        large = []
        for i, arrays in enumerate(zip(params, grads, *states)):
            n = arrays[0].numel()
            if n < SMALL:
                rows_by_dtype.setdefault(arrays[0].dtype, []).append((n, *map(data_ptr, arrays)))
            else:
                large.append(i)
        name = "sgd_momentum" if op == "sgd" and states else op
        for dt, rows in rows_by_dtype.items():
            addrs, sizes = address_table(rows)
            _ADDR_KERNELS[name](addrs, sizes, *typed(NUMPY_DTYPE[str(dt)]))
        if not large:
            return None
    for i in large:
        p = backend.storage_views([params[i]])[0]
        contiguous = params[i].is_contiguous() if hasattr(params[i], "is_contiguous") else params[i].flags.c_contiguous
        if g_views is not None and contiguous:
            g = g_views[i]
        else:  # a dense permuted leaf: its storage order
            g = backend.storage_views([grads[i]])[0]
        sv = [backend.storage_views([s[i]])[0] for s in states]
        kernel_for(op, len(states), p.size)(p, g, *sv, *typed(p.dtype))
    return None


def sgd_leaves(backend, params, grads, bufs, skip, scalars):
    """The SGD(-momentum) step of every leaf not in ``skip`` (:func:`run`: small torch leaves in one
    call); ``bufs``: the momentum buffers of every leaf, or ``None``; ``scalars``: ``(lr, μ, λ, nesterov)``."""
    rest = [k for k in range(len(params)) if k not in skip]
    if rest:
        states = [[bufs[k] for k in rest]] if bufs else []
        run(backend, "sgd", [params[k] for k in rest], [grads[k] for k in rest], states, scalars)
