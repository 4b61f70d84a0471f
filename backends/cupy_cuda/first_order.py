"""First-order steps on the CUDA backend (``first_order.cu``): one pass per leaf over params,
grads and state, with the arithmetic of ``arrayopt.first_order`` in the same order::

    sgd       d = g + λθ;  θ ← θ - η d                          (momentum 0, no state)
              d = g + λθ;  b ← μ b + d;  θ ← θ - η (d + μ b | b)  (momentum, Nesterov)
    adam      g ← g + l2 θ;  θ ← θ·decay;  m ← m + (1-β1)(g - m);  v ← β2 v + (1-β2) g²
              θ ← θ - step_size · m / (√v / √(1-β2^t) + ε)
    adagrad   d = g + λθ;  s ← s + d²;  θ ← θ - η d / (√s + ε)

The file also holds ``count_nonfinite``, the backend's finiteness pre-pass.

Argument convention of every step kernel::

    (params, grads, *states, n, *scalars)

``n`` is ``numpy.int64`` (``long long``); the scalars are ``step_scalars(t, lr)`` cast to the
array's dtype, except SGD's ``nesterov`` bool, passed as ``numpy.int32`` 0/1 (C ``int``).
"""

from __future__ import annotations

import numpy as np

from ._loader import kernel_file, launch_shape, max_blocks, scalar_type

__all__ = ["COUNT_KERNEL", "KERNELS", "OPS", "count_args", "kernel_args", "kernel_base", "run"]

# the step descriptions are tuples of step scalars: no option to refuse
OPS = {"sgd": {}, "adam": {}, "adagrad": {}}

# (op, number of state arrays) -> kernel template name in first_order.cu
_STEP_KERNELS = {
    ("sgd", 0): "sgd_step",
    ("sgd", 1): "sgd_momentum_step",
    ("adam", 2): "adam_step",
    ("adagrad", 1): "adagrad_step",
}
COUNT_KERNEL = "count_nonfinite"
KERNELS = kernel_file("first_order.cu", (*sorted(set(_STEP_KERNELS.values())), COUNT_KERNEL))


def kernel_base(op: str, n_states: int) -> str:
    """Template name of the step kernel for ``op`` with ``n_states`` state arrays."""
    try:
        return _STEP_KERNELS[(op, n_states)]
    except KeyError:
        raise ValueError(f"cupy_cuda: no kernel for op {op!r} with {n_states} state arrays") from None


def kernel_args(p, g, states, scalars) -> tuple:
    """Arguments of a step kernel: ``(p, g, *states, int64 n, *typed scalars)``."""
    cast = scalar_type(p.dtype)
    typed = tuple(np.int32(bool(s)) if isinstance(s, (bool, np.bool_)) else cast(s)
                  for s in scalars)
    return (p, g, *states, np.int64(p.size), *typed)


def count_args(x, counter) -> tuple:
    """Arguments of ``count_nonfinite``: ``(x, int64 n, uint64 *counter)``."""
    return (x, np.int64(x.size), counter)


def run(backend, op, params, grads, states, step, g_views=None):
    """``op``'s step in place on every leaf; ``step`` is the tuple of step scalars and ``states``
    one list of leaves per state array (SGD with momentum: ``[buffers]``, Adam: ``[m, v]``)."""
    if not params:
        return None
    base = kernel_base(op, len(states))
    p_views = backend.views(params)
    g_views = g_views if g_views is not None else backend.views(grads)
    s_views = [backend.views(s) for s in states]
    device = p_views[0].device.id
    blocks = max_blocks(device)
    for i, (p, g) in enumerate(zip(p_views, g_views)):
        if p.size == 0:
            continue
        kernel = KERNELS.function(base, p.dtype, device)
        grid, block = launch_shape(p.size, blocks)
        kernel(grid, block, kernel_args(p, g, [s[i] for s in s_views], step))
    return None
