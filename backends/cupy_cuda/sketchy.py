"""Sketchy's step on the CUDA backend (``sketchy.cu``): the driver of ``backends/numba_cpu/sketchy.py``.

The directions ``D`` come from the namespace (cuBLAS). Per preconditioned leaf with a graft,
``sketchy_norms`` updates the graft accumulator and leaves per-thread float64 partial sums of
``a²`` and ``D²``; one device-to-host read per step brings every leaf's two sums back for the
graft scales ``‖a‖/‖D‖``; then ``sketchy_write`` applies the scale (or the graft direction),
momentum, weight decay and writes the params in place.
"""

from __future__ import annotations

import numpy as np

from ...sketchy.step import GRAFT_CODES

from ._loader import kernel_file, launch_shape, max_blocks

__all__ = ["KERNELS", "OPS", "run"]

# as numba_cpu: rmsprop_normalized needs ‖g‖ before its accumulator, sqrt_n takes the reference
OPS = {"sketchy": {"graft": frozenset({"none", "sgd", "adagrad", "rmsprop", "adam"})}}
# sketchy_norms (g, acc, d, n, int kind, b2, omb2, eps, bc2s, double* part_a, double* part_d) and
# sketchy_write (p, g, acc, d, m, n, int kind, int precond, scale, b2, omb2, eps, bc2s, b1, w1,
# int nesterov, int use_m, wd, lr); kind: SketchyStep.graft_code
KERNELS = kernel_file("sketchy.cu", ("sketchy_norms", "sketchy_write"))


def _scaled_norm(x) -> float:
    """``s·‖x/s‖`` with ``s = max|x|`` (:func:`arrayopt.grafting.norm`), for extreme float64 sums."""
    s = float(abs(x).max()) if x.size else 0.0
    return 0.0 if s == 0.0 else s * float(np.sqrt(float(((x / s) * (x / s)).sum())))


def run(backend, op, params, grads, states, step, g_views=None):
    """Sketchy's step in place; ``states = [graft accumulators or None, momentum or None,
    directions D]`` (``None`` for a leaf that takes the graft step only)."""
    if not params:
        return None
    import cupy

    accs, moms, directions = states
    p_views = backend.views(params)
    g_views = g_views if g_views is not None else backend.views(grads)
    a_views = backend.views(accs) if accs else None
    m_views = backend.views(moms) if moms else None
    dtype = p_views[0].dtype
    dt = dtype.type
    device = p_views[0].device.id
    blocks = max_blocks(device)
    kind = step.graft_code
    sc = (dt(step.graft_b2), dt(1.0 - step.graft_b2), dt(step.graft_eps), dt(step.graft_bc2 ** 0.5))
    dummy = cupy.empty(1, dtype)
    d_views, sums, normed = [], [], []
    for i, (p, g) in enumerate(zip(p_views, g_views)):
        d = backend.views([directions[i]])[0] if directions[i] is not None else None
        d_views.append(d)
        if d is None or step.graft == "none" or p.size == 0:
            continue
        acc = a_views[i] if a_views is not None else dummy
        grid, block = launch_shape(p.size, blocks)
        part_a = cupy.zeros(grid[0] * block[0], np.float64)
        part_d = cupy.zeros(grid[0] * block[0], np.float64)
        KERNELS.function("sketchy_norms", dtype, device)(
            grid, block, (g, acc, d, np.int64(p.size), np.int32(kind), *sc, part_a, part_d))
        sums += [part_a.sum(), part_d.sum()]
        normed.append(i)
    host = cupy.stack([cupy.asarray(x, dtype=np.float64).reshape(()) for x in sums]).get() if sums else []
    scales = {}
    for k, i in enumerate(normed):
        sa, sd = float(host[2 * k]), float(host[2 * k + 1])
        na, nd = float(np.sqrt(sa)), float(np.sqrt(sd))
        if dtype == np.float64 and not (0.0 < sa < np.inf and 0.0 < sd < np.inf):
            g, acc = g_views[i], (a_views[i] if a_views is not None else None)
            if kind == GRAFT_CODES["sgd"]:
                a = g
            elif kind == GRAFT_CODES["adam"]:
                a = g / (acc ** 0.5 / sc[3] + sc[2])
            else:
                a = g / (acc ** 0.5 + sc[2])
            na, nd = _scaled_norm(a), _scaled_norm(d_views[i])  # extreme float64 magnitudes
        scales[i] = dt(na / nd) if nd > 0 else dt(0.0)  # zero guard
    w1 = dt(1.0 - step.b1) if step.ema else dt(1.0)
    flags = (np.int32(bool(step.nesterov)), np.int32(m_views is not None))
    for i, (p, g) in enumerate(zip(p_views, g_views)):
        if p.size == 0:
            continue
        d = d_views[i]
        scale = scales.get(i, dt(1.0)) if d is not None else dt(0.0)
        grid, block = launch_shape(p.size, blocks)
        KERNELS.function("sketchy_write", dtype, device)(
            grid, block, (p, g, a_views[i] if a_views is not None else dummy, d if d is not None else dummy,
                          m_views[i] if m_views is not None else dummy, np.int64(p.size), np.int32(kind),
                          np.int32(d is not None), scale, *sc, dt(step.b1), w1, *flags,
                          dt(step.weight_decay), dt(step.lr)))
