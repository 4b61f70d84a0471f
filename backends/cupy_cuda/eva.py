"""Eva's fused step on the CUDA backend (``eva.cu``): the driver of ``backends/numba_cpu/eva.py``
with the two passes as kernels.

Per preconditioned weight ``G`` (``d_out`` rows): ``eva_row_reduce`` gives ``(Gā)_r`` and
``‖G_r‖²``; the device forms ``β`` (Eva) or ``1/(γ + ‖ā‖²)`` (Eva-f), the row coefficients
``c_r`` and ``⟨P, G⟩``; one device-to-host read per step brings every layer's ``⟨P, G⟩`` and
``‖G‖²`` back for the KL factor ``ν`` (``arrayopt.linalg.kl_scale``) and the finiteness check;
then ``eva_apply`` writes ``d = (G - c_r ā_c)·(ν/γ) (+ λθ)`` and the SGD-momentum step for the
weight and its bias column. Leaves without statistics take ``first_order.cu``'s SGD kernels.
"""

from __future__ import annotations

import numpy as np

from . import first_order
from ._loader import kernel_file, launch_shape, max_blocks

__all__ = ["KERNELS", "OPS", "run"]

# eva.cu reads a weight as (d_out, d_in) rows; Eva-s has no kernel
OPS = {"eva": {"variant": frozenset({"eva", "eva_f"}), "weight_layout": frozenset({"out_in"})}}
# eva_row_reduce (G, a, rows, n, rowdot, rowsq) and
# eva_apply (p, G, buf, a, coef, rows, n, scale, lr, mu, wd, int nesterov, int use_buf)
KERNELS = kernel_file("eva.cu", ("eva_row_reduce", "eva_apply"))


def run(backend, op, params, grads, states, step, g_views=None):
    """Eva's step in place; ``states = [momentum buffers or None, layers]`` (``layers``: ``(i, b,
    ā, ḡ)`` per weight, as for the Numba driver). Returns ``False``, having written nothing, when
    a preconditioned gradient is not finite, else ``None``."""
    if not params:
        return None
    import cupy

    from arrayopt.eva.math import kl_scale

    bufs, layers = states
    p_views = backend.views(params)
    g_views = g_views if g_views is not None else backend.views(grads)
    b_views = backend.views(bufs) if bufs else None
    dtype = p_views[0].dtype
    dt = dtype.type
    device = p_views[0].device.id
    blocks = max_blocks(device)
    damping = dt(step.damping)
    plans, scalars = [], []
    for i, b, a, g in layers:
        a = backend.views([a])[0]
        rows = int(params[i].shape[0])
        G = g_views[i]
        n_in = G.size // rows
        rowdot, rowsq = cupy.empty(rows, dtype), cupy.empty(rows, dtype)
        grid, block = launch_shape(rows, blocks)
        KERNELS.function("eva_row_reduce", dtype, device)(
            grid, block, (G, a, np.int64(rows), np.int64(n_in), rowdot, rowsq))
        if b is not None:
            gb = g_views[b]
            rowdot = rowdot + gb * a[n_in]
            rowsq = rowsq + gb * gb
        gsq = rowsq.sum()
        if g is not None:  # Eva: β = ḡᵀGā/(γ + ‖ā‖²‖ḡ‖²), c_r = β ḡ_r
            g = backend.views([g])[0]
            gGa = (g * rowdot).sum()
            beta = gGa / (damping + (a * a).sum() * (g * g).sum())
            coef = beta * g
            inner = (gsq - beta * gGa) / damping
        else:  # Eva-f: c_r = (Gā)_r/(γ + ‖ā‖²)
            c = dt(1.0) / (damping + (a * a).sum())
            coef = c * rowdot
            inner = (gsq - c * (rowdot * rowdot).sum()) / damping
        ps = gsq
        if step.kl_mode == "rescale":  # ‖P‖² = ‖G - c āᵀ‖²/γ², by rows
            P2 = (G.reshape(rows, n_in) - coef[:, None] * a[None, :n_in]) / damping
            ps = (P2 * P2).sum()
            if b is not None:
                pb = (g_views[b] - coef * a[n_in]) / damping
                ps = ps + (pb * pb).sum()
        plans.append((i, b, a, coef.astype(dtype), G, rows, n_in))
        scalars += [inner, gsq, ps]
    if plans:
        host = cupy.stack([cupy.asarray(x, dtype=dtype).reshape(()) for x in scalars]).get()
        inners, g_sq, p_sq = list(host[0::3]), list(host[1::3]), list(host[2::3])
        if not np.all(np.isfinite(g_sq)):  # NaN/Inf in G, or squares past the dtype's range
            checked = [g_views[i] for i, b, *_ in plans] + [g_views[b] for _, b, *_ in plans if b is not None]
            if not backend.all_finite(checked):
                return False
    use_nu = step.kl_mode != "none" and bool(plans)
    nu = dt(kl_scale([np.asarray(x) for x in inners], step.lr, step.kl_clip, step.kl_mode,
                     p_sq=[np.asarray(x) for x in p_sq] if step.kl_mode == "rescale" else None,
                     g_sq=[np.asarray(x) for x in g_sq] if step.kl_mode == "rescale" else None)) \
        if use_nu else dt(1.0)
    scale = nu / damping
    lr, mu, wd = dt(step.lr), dt(step.momentum), dt(step.weight_decay)
    flags = (np.int32(bool(step.nesterov)), np.int32(b_views is not None))
    dummy = cupy.empty(1, dtype)
    done = set()
    for i, b, a, coef, G, rows, n_in in plans:
        for leaf, a_part, n in ((i, a[:n_in], n_in), (b, a[n_in:n_in + 1], 1)):
            if leaf is None:
                continue
            buf = b_views[leaf] if b_views is not None else dummy
            grid, block = launch_shape(rows * n, blocks)
            KERNELS.function("eva_apply", dtype, device)(
                grid, block, (p_views[leaf], g_views[leaf], buf, a_part, coef, np.int64(rows), np.int64(n),
                              scale, lr, mu, wd, *flags))
            done.add(leaf)
    sgd = (step.lr, step.momentum, step.weight_decay, step.nesterov)
    base = first_order.kernel_base("sgd", 1 if b_views is not None else 0)
    for k, (p, g) in enumerate(zip(p_views, g_views)):
        if k in done or p.size == 0:
            continue
        leaf_states = [b_views[k]] if b_views is not None else []
        grid, block = launch_shape(p.size, blocks)
        kernel = first_order.KERNELS.function(base, p.dtype, device)
        kernel(grid, block, first_order.kernel_args(p, g, leaf_states, sgd))
    return None
