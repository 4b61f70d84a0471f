"""Block-local SONew on one flat leaf: every block of ``bsz`` entries in one parallel pass.

The kernels and their math are in ``block_kernels.py`` (diagonal and tridiagonal blocks, fused)
and ``_gen_block_drivers.py`` (bands ``b >= 2``, one generated driver per band kind). With
``bsz = n`` the same drivers run the options the whole-tensor kernels do not fuse
(``graft="rmsprop_normalized"``, ``small_param_fallback="adam"``).
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads

from . import _gen_band_kernels as unrolled
from . import _gen_block_drivers as drivers
from .block_kernels import blocks_step_diag, blocks_step_tri

__all__ = ["run_blocks"]


def run_blocks(step, p, g, m, band, nu, bsz, small):
    """Block-local SONew on one flat leaf in place; returns ``(removed_edges, fallback_rows)``.

    ``step``: the frozen ``SONewStep``; ``bsz``: the block size (``n`` for whole-tensor
    options the parallel-chunk kernels do not fuse); ``small``: the leaf has ``ndim <= 1``.
    """
    cast = p.dtype.type
    b = band.shape[1] - 1
    n = p.size
    bsz = max(1, min(bsz, n))
    nblocks = (n + bsz - 1) // bsz
    graft = step.graft_code
    nu_view = nu if nu is not None else np.zeros(1, p.dtype)
    removed = np.zeros(nblocks, np.int64)
    adam_fallback = bool(small and step.small_param_fallback == "adam")
    if b <= 1:  # the fused diag / tridiagonal blocks
        nthreads = min(get_num_threads(), nblocks)
        common = (cast(step.graft_eps), graft, cast(step.eps), cast(step.eps_min), step.relative_eps,
                  cast(step.tau(p.dtype)), cast(-step.lr), cast(step.weight_decay), adam_fallback, removed)
        if b == 0:  # no cancellation downstream: multiply by 1/bc1, 1/bc2 (≤ 1 ulp more)
            blocks_step_diag(p, g, m, band.reshape(-1), nu_view, bsz, nthreads, cast(step.omb1), cast(step.b2),
                             cast(step.omb2), cast(1.0 / step.bc1), cast(1.0 / step.bc2), *common)
        else:  # Schur complements cancel: Ĥ and m̂ divided as in the reference, bit for bit
            blocks_step_tri(p, g, m, band.reshape(-1), nu_view, bsz, nthreads, cast(step.omb1), cast(step.b2),
                            cast(step.omb2), cast(step.bc1), cast(step.bc2), *common)
        edges = int(removed.sum())
        return edges, edges  # a tridiagonal row that falls back drops its one edge
    if b in unrolled.STATS_CHUNK:
        kind, saved = str(b), np.zeros((1, b, b + 1), p.dtype)
    else:
        kind, saved = "band", np.zeros(1, p.dtype)
    fallback = np.zeros(nblocks, np.int64)
    drivers.DRIVERS[kind](p, g, m, band, nu_view, saved, bsz, min(get_num_threads(), nblocks), cast(step.omb1),
                          cast(step.b2), cast(step.omb2), cast(step.bc1), cast(step.bc2), cast(step.graft_eps), graft,
                          cast(step.eps), cast(step.eps_min), step.relative_eps, cast(step.tau(p.dtype)),
                          cast(-step.lr), cast(step.weight_decay), adam_fallback, removed, fallback,
                          np.zeros(nblocks, p.dtype), np.zeros(nblocks), np.zeros(nblocks), np.zeros(nblocks, p.dtype))
    return int(removed.sum()), int(fallback.sum())
