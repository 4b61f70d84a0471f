"""The whole-tensor SONew step of one flat leaf: parallel kernels over chunks of ``CHUNK`` rows.

Per band: the statistics kernel (``m``, the band, the per-chunk max row sum of ``|Ĥ|`` and the
graft's norm²), ``ε_eff = max(ε·‖Ĥ‖∞, ε_min)`` (``SONewStep.eps_effective``), the factor and
``u = X m̂`` (written to the params directly with no graft), then with a graft
``p ← p - η (c u + λ p)``, ``c = ‖a‖/‖u‖`` (``arrayopt.grafting.graft_scale``). Kernels:
``diag_tri.py`` (``b = 0, 1``), ``_gen_band_kernels.py`` (unrolled, ``2 <= b <= 8``), ``band.py``
(any larger ``b``). Every scratch array is allocated here, per call: two threads stepping at
once (the kernels release the GIL) never share one.
"""

from __future__ import annotations

import numpy as np

from arrayopt.grafting import graft_scale

from . import _gen_band_kernels as unrolled
from .band import band_factor_lt, band_l_apply, band_rowmax, band_stats, save_band_rows
from .diag_tri import diag_apply, diag_stats, save_boundaries, scaled_apply, tri_precond, tri_stats
from .grafts import GRAFT_NONE

__all__ = ["CHUNK", "step_leaf"]

CHUNK = 16384  # rows per parallel chunk


def step_leaf(step, p, g, m, band) -> tuple:
    """One whole-tensor SONew step on a flat leaf in place; returns ``(removed_edges, fallback_rows)``.

    ``step``: the frozen ``SONewStep`` (its graft one of ``none``, ``adam``, ``sgd``, ``momentum``;
    the block driver runs the others); ``p``, ``g``, ``m``: flat views; ``band``: the C-contiguous
    ``(n, b+1)`` band state.
    """
    graft = step.graft_code
    cast = p.dtype.type
    n = p.size
    b = band.shape[1] - 1
    tau = cast(step.tau(p.dtype))
    chunk = CHUNK
    nchunks = (n + chunk - 1) // chunk
    bs = n  # one block: the statistics couple every pair of neighbours
    norms = np.zeros(nchunks, np.float64)
    rows = np.zeros(nchunks, p.dtype)
    removed = np.zeros(nchunks, np.int64)
    omb1, b2, omb2 = cast(step.omb1), cast(step.b2), cast(step.omb2)
    cbc1, cbc2, geps = cast(step.bc1), cast(step.bc2), cast(step.graft_eps)
    if b == 1:
        saved = np.empty(nchunks, p.dtype)
        save_boundaries(band, nchunks, chunk, saved)
        tri_stats(g, m, band.reshape(-1), saved, omb1, b2, omb2, cbc1, cbc2, geps, graft, rows, norms, chunk,
                  bs)
    elif b == 0:
        diag_stats(g, m, band.reshape(-1), omb1, b2, omb2, cbc1, cbc2, geps, graft, rows, norms, chunk)
    elif b in unrolled.STATS:
        saved = np.empty((nchunks, b, b + 1), p.dtype)
        save_band_rows(band, nchunks, chunk, saved)
        unrolled.STATS[b](g, m, band.reshape(-1), saved, omb1, b2, omb2, cbc1, cbc2, geps, graft, rows, norms,
                          chunk, bs)
    else:
        band_stats(g, m, band, omb1, b2, omb2, cbc1, cbc2, geps, graft, norms, chunk, bs)
        if step.relative_eps:
            band_rowmax(band, cbc2, rows, chunk)
    target = float(np.sqrt(norms.sum()))
    # ε_eff = max(ε·‖Ĥ‖∞, ε_min) in the param dtype (SONewStep.eps_effective)
    eps_eff = cast(step.eps_effective(np, rows.max() if step.relative_eps else None))
    write_p = graft == GRAFT_NONE
    neg_lr, wd = cast(-step.lr), cast(step.weight_decay)
    u = p if write_p else np.empty(n, p.dtype)
    if b == 1:
        tri_precond(p, m, band.reshape(-1), u, cbc1, cbc2, eps_eff, tau, neg_lr, wd, write_p, norms, removed, chunk)
        fallback = int(removed.sum())
        edges = fallback
    elif b == 0:
        # diag-SONew: X = diag(1/(H_jj + ε)), one vectorised sweep
        diag_apply(p, m, band.reshape(-1), u, cbc1, cbc2, eps_eff, neg_lr, wd, write_p, norms, chunk)
        edges = fallback = 0
    elif b in unrolled.FACTOR_APPLY:
        rows_fb = np.zeros(nchunks, np.int64)
        unrolled.FACTOR_APPLY[b](p, m, band, u, cbc1, cbc2, eps_eff, tau, neg_lr, wd, write_p, norms, removed,
                                 rows_fb, chunk)
        edges, fallback = int(removed.sum()), int(rows_fb.sum())
    else:
        psi = np.empty((n, b), p.dtype)
        t = np.empty(n, p.dtype)
        rows_fb = np.zeros(nchunks, np.int64)
        band_factor_lt(m, band, psi, t, cbc1, cbc2, eps_eff, tau, removed, rows_fb, chunk)
        band_l_apply(p, psi, t, u, neg_lr, wd, write_p, norms, chunk)
        edges, fallback = int(removed.sum()), int(rows_fb.sum())
    if not write_p:
        # graft scale ‖a‖/‖u‖, 0 when ‖u‖ = 0 (arrayopt.grafting.graft_scale), float64 norms
        scale = cast(graft_scale(np, np.float64(target), np.float64(np.sqrt(norms.sum()))))
        scaled_apply(p, u, scale, neg_lr, wd)
    return edges, fallback
