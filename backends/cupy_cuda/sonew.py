"""SONew on the CUDA backend (``sonew.cu``, per-row math in ``sonew_rows.cuh``): the fused step of
the Numba backend with one thread per row.

Whole tensors (``block_size=None``): statistics, band ∞-norm (relative eps), then for ``band=1``
one kernel for the tridiagonal factor with edge removal and ``u = X m̂``; for other bands
(``<= 32``) one batched kernel factoring every row's ``b×b`` window with the bandwidth fallback
and one for ``u = L t``; then the grafted update. Global norms are block reductions plus atomics
and stay on the device.

Block-local (``block_size``): one launch per leaf, one thread block per SONew block
(``sonew_block_step_8`` / ``_32``), every graft and the Adam fallback for small leaves.

The removal counts of all leaves come back in one device-to-host read per step. Scalars are
typed as the param dtype (the Numba backend's casts), flags and ``b`` as int32, ``n`` as int64;
the graft is ``SONewStep.graft_code`` (``arrayopt/sonew/step.py``).
"""

from __future__ import annotations

import math

import numpy as np

from ...sonew.step import GRAFT_CODES
from ._loader import kernel_file, launch_shape, max_blocks, scalar_type

__all__ = ["BLOCK_THREADS", "EXACT_BANDS", "KERNELS", "OPS", "SONEW_MAX_BAND", "block_launch", "factor_kernel",
           "is_band_state", "launches", "refuse_options", "run"]

# the widest band the kernels take (per-thread window arrays); wider bands take the reference
SONEW_MAX_BAND = 32
# sonew_band_factor_b<B>: b fixed at compile time
EXACT_BANDS = range(2, 9)
# threads per block of the block-local kernel (one thread block per SONew block)
BLOCK_THREADS = 256
KERNELS = kernel_file("sonew.cu", ("sonew_stats", "sonew_rowmax", "sonew_tri_precond", "sonew_band_factor_8",
                                   "sonew_band_factor_32", "sonew_band_apply", "sonew_scaled_apply",
                                   *(f"sonew_band_factor_b{b}" for b in EXACT_BANDS),
                                   "sonew_block_step_8", "sonew_block_step_32"))


def _band_fits(b) -> bool:
    """the kernels' window arrays hold at most SONEW_MAX_BAND = 32"""
    return b <= SONEW_MAX_BAND


OPS = {
    "sonew": {
        # every graft and fallback block-local (sonew_block_step); whole tensors: not
        # rmsprop_normalized nor the Adam fallback (refuse_options)
        "band": _band_fits,
        "order": frozenset({"C"}),  # no first-axis-fastest flattening in sonew.cu
    },
}


def refuse_options(op, step):
    """What the whole-tensor kernels do not fuse beyond ``OPS`` (``None`` if nothing)."""
    if step.block_size is None:
        if step.graft == "rmsprop_normalized":
            return "graft='rmsprop_normalized' is not fused for whole tensors (block_size=None)"
        if step.small_param_fallback != "sonew":
            return (f"small_param_fallback={step.small_param_fallback!r} is not fused for whole "
                    "tensors (block_size=None)")
    return None


def factor_kernel(b: int) -> str:
    """The banded factor kernel for half-bandwidth ``b``: ``b`` fixed at compile time for
    2..8 (window in registers), else a runtime ``b`` in window arrays of 8 or 32."""
    if b in EXACT_BANDS:
        return f"sonew_band_factor_b{b}"
    if b <= 8:
        return "sonew_band_factor_8"
    if b <= SONEW_MAX_BAND:
        return "sonew_band_factor_32"
    raise ValueError(f"cupy_cuda: SONew kernels take band <= {SONEW_MAX_BAND}, got {b}")


def is_band_state(a, p) -> bool:
    """``a`` has the shape of SONew's band state for param ``p``: ``(p.size, b+1)``, b <= max."""
    shape = tuple(a.shape)
    return (len(shape) == 2 and shape[0] == math.prod(tuple(p.shape))
            and 1 <= shape[1] <= SONEW_MAX_BAND + 1)


def launches(step, p, g, m, band, b, norms, counts, rowmax, u=None, psi=None, t=None) -> list:
    """The kernel launches ``[(base, args)]`` of one whole-tensor SONew step on one leaf.

    ``step``: the frozen ``arrayopt.sonew.step.SONewStep`` (hyperparameters, ``lr``,
    ``bc1``, ``bc2``). ``p, g, m, band`` are flat views (``band`` of ``n*(b+1)`` entries);
    ``norms`` (float64, 2), ``counts`` (uint64, 2) and ``rowmax`` (param dtype, 1) are zeroed
    device scratch; ``u`` (n) is needed with a graft, ``psi`` (n*b) and ``t`` (n) when
    ``b != 1``.
    """
    cast = scalar_type(p.dtype)
    n, bi = np.int64(p.size), np.int32(b)
    graft = step.graft_code
    cbc1, cbc2 = cast(step.bc1), cast(step.bc2)
    out = [("sonew_stats", (g, m, band, n, bi, cast(step.omb1), cast(step.b2),
                            cast(step.omb2), cbc1, cbc2, cast(step.graft_eps),
                            np.int32(graft), norms))]
    if step.relative_eps:
        out.append(("sonew_rowmax", (band, n, bi, cbc2, rowmax)))
    # ε_eff = max(ε·rowmax, ε_min) (relative) or ε, evaluated on the device from these
    eps_args = (rowmax, cast(step.eps), cast(step.eps_min), np.int32(bool(step.relative_eps)),
                cast(step.tau(np.dtype(p.dtype))))
    write_p = graft == GRAFT_CODES["none"]
    dest = p if write_p else u
    neg_lr, wd, wp = cast(-step.lr), cast(step.weight_decay), np.int32(write_p)
    if b == 1:
        out.append(("sonew_tri_precond", (p, m, band, dest, n, cbc1, cbc2, *eps_args,
                                          neg_lr, wd, wp, norms, counts)))
    else:
        out.append((factor_kernel(b), (m, band, psi, t, n, bi, cbc1, cbc2, *eps_args, counts)))
        out.append(("sonew_band_apply", (p, psi, t, dest, n, bi, neg_lr, wd, wp, norms)))
    if not write_p:
        out.append(("sonew_scaled_apply", (p, u, n, norms, neg_lr, wd)))
    return out


def block_launch(step, p, g, m, band, nu, b, counts, psi, t, u, small) -> tuple:
    """``(base, grid, block, args)`` of block-local SONew (``step.block_size``) on one leaf.

    One thread block of ``BLOCK_THREADS`` per SONew block (``sonew_block_step_8`` for
    ``b <= 8``, ``_32`` up to 32); ``nu`` is the rmsprop_normalized accumulator (a 1-entry
    dummy otherwise), ``psi`` (n·b, at least 1), ``t`` and ``u`` (n) scratch; ``small``: the
    leaf has ``ndim <= 1`` (``small_param_fallback``).
    """
    cast = scalar_type(p.dtype)
    n = int(p.size)
    bsz = max(1, min(int(step.block_size), n))
    base = "sonew_block_step_8" if b <= 8 else "sonew_block_step_32"
    if b > SONEW_MAX_BAND:
        raise ValueError(f"cupy_cuda: SONew kernels take band <= {SONEW_MAX_BAND}, got {b}")
    args = (p, g, m, band, nu, psi, t, u, np.int64(n), np.int32(b), np.int64(bsz), cast(step.omb1),
            cast(step.b2), cast(step.omb2), cast(step.bc1), cast(step.bc2), cast(step.graft_eps),
            np.int32(step.graft_code), cast(step.eps), cast(step.eps_min),
            np.int32(bool(step.relative_eps)), cast(step.tau(np.dtype(p.dtype))), cast(-step.lr),
            cast(step.weight_decay), np.int32(bool(small and step.small_param_fallback == "adam")), counts)
    return base, ((n + bsz - 1) // bsz,), (BLOCK_THREADS,), args


def run(backend, op, params, grads, states, step, g_views=None) -> list:
    """SONew's fused step in place on every leaf; ``states = [mus, bands]`` (``+ [nus]``, the
    rmsprop_normalized accumulators). Returns per-leaf ``(removed_edges, fallback_rows)`` as
    ints (one device-to-host read for all leaves)."""
    if not params:
        return []
    import cupy

    mus, bands = states[0], states[1]
    nus = states[2] if len(states) > 2 else None
    p_views = backend.views(params)
    g_views = g_views if g_views is not None else backend.views(grads)
    m_views = backend.views(mus)
    b_views = backend.views(bands)
    device = p_views[0].device.id
    blocks = max_blocks(device)
    k = len(p_views)
    norms = cupy.zeros((k, 2), dtype=np.float64)
    counts = cupy.zeros((k, 2), dtype=np.uint64)
    rowmax: dict = {}
    nu_views = backend.views(nus) if nus is not None else [None] * k
    for i, (p, g, m, band) in enumerate(zip(p_views, g_views, m_views, b_views)):
        n = p.size
        if n == 0:
            continue
        b = int(bands[i].shape[1]) - 1
        if step.block_size is not None:  # block-local: one launch, one thread block per block
            nu = nu_views[i] if nu_views[i] is not None else cupy.zeros(1, dtype=p.dtype)
            base, grid, block, args = block_launch(
                step, p, g, m, band, nu, b, counts[i], cupy.empty(max(1, n * b), dtype=p.dtype),
                cupy.empty(n, dtype=p.dtype), cupy.empty(n, dtype=p.dtype), len(params[i].shape) <= 1)
            KERNELS.function(base, p.dtype, device)(grid, block, args)
            continue
        rm = rowmax.get(p.dtype)
        if rm is None:
            rm = rowmax[p.dtype] = cupy.zeros(k, dtype=p.dtype)
        u = None if step.graft == "none" else cupy.empty(n, dtype=p.dtype)
        psi = t = None
        if b != 1:
            psi, t = cupy.empty(n * b, dtype=p.dtype), cupy.empty(n, dtype=p.dtype)
        grid, block = launch_shape(n, blocks)
        for base, args in launches(step, p, g, m, band, b, norms[i], counts[i], rm[i:i + 1], u, psi, t):
            KERNELS.function(base, p.dtype, device)(grid, block, args)
    host = counts.get()
    return [(int(e), int(f)) for e, f in host]
