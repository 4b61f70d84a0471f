r"""Block-local SONew (``block_size`` of ``arrayopt.sonew``): one pass over memory, blocks in parallel.

With blocks of ``B`` consecutive entries of the flattened tensor the band is cut
at block edges, ``ε_eff = max(ε·max_{i∈blk} Σ_j |Ĥ_ij|, ε_min)`` and both graft
norms are per block, so a block needs nothing from any other block. Per block
(``prange`` over blocks, each block sequential in one thread):

1. statistics ``m``, ``B_t`` in place, the block's max row sum and the graft's
   target norm² (the chunk body of the whole-tensor statistics kernel, run on the
   block as one chunk);
2. ``ε_eff``, the factor and ``u = X m̂`` into a block-sized buffer, with ``‖u‖²``
   (the chunk body of the whole-tensor factor/apply kernel);
3. ``p ← p - η (c u + λ p)``, ``c = ‖a‖/‖u‖`` (0 when ``‖u‖ = 0``), while the block
   is still in cache.

``g``, ``m``, the band and ``p`` of a block stay in L2 between the three steps
(``B = 16384`` float32 entries, tridiagonal: ``g, p, m``, two band columns and the
``u`` buffer, ``6·4 B·B = 384 KiB``), so each byte of state crosses the memory bus once per step.
``graft="rmsprop_normalized"`` (``ĝ = g/‖g‖_blk``, ``ν ← β₂ν + (1-β₂)ĝ²``,
``a = ĝ/(√ν + ε_g)``) and ``small_param_fallback="adam"`` (``a = m̂/(√v̂ + ε_g)``
replaces the update) are one more loop over the cached block. The same driver
with ``B = n`` runs those two options for whole tensors (block-local with
``B ≥ n`` is the whole-tensor step).

The drivers, one per band kind (``blocks_step_<kind>`` in ``sonew_block_drivers.py``,
written by ``band_codegen.py`` from one template so that Numba caches each), call the
adapters below. Arithmetic is the whole-tensor kernels' (the same ``_chunk`` functions), so the
block-local step equals the reference's to float rounding of the norms (float64
sums here, overflow-safe scaled float32 sums in the reference).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .sonew import (_SERIAL, band_factor_lt_chunk, band_l_apply_chunk, band_rowmax_chunk, band_stats_chunk,
                    diag_apply_chunk, diag_stats_chunk, tri_precond_chunk)

__all__ = ["run_blocks"]

GRAFT_RMSPROP_NORMALIZED = 4


# ------------------------------------------------ adapters: one signature per step for every band


@njit(**_SERIAL)
def _diag_stats(g, m, bf, saved, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk, bs, c):
    diag_stats_chunk(g, m, bf, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk, c)


@njit(**_SERIAL)
def _diag_factor(p, m, band, u, bc1, bc2, eps_eff, tau, neg_lr, wd, write_p, norms_out, removed_out,
                 fallback_out, chunk, c):
    diag_apply_chunk(p, m, band.reshape(-1), u, bc1, bc2, eps_eff, neg_lr, wd, write_p, norms_out, chunk, c)
    removed_out[c] = 0
    fallback_out[c] = 0


@njit(**_SERIAL)
def _tri_factor(p, m, band, u, bc1, bc2, eps_eff, tau, neg_lr, wd, write_p, norms_out, removed_out,
                fallback_out, chunk, c):
    tri_precond_chunk(p, m, band.reshape(-1), u, bc1, bc2, eps_eff, tau, neg_lr, wd, write_p, norms_out,
                      removed_out, chunk, c)
    fallback_out[c] = removed_out[c]  # a tridiagonal row that falls back drops its one edge


@njit(**_SERIAL)
def _band_stats(g, m, bf, saved, omb1, b2, omb2, bc1, bc2, graft_eps, graft, rows_out, norms_out, chunk, bs, c):
    band = bf.reshape((g.size, bf.size // g.size))
    band_stats_chunk(g, m, band, omb1, b2, omb2, bc1, bc2, graft_eps, graft, norms_out, chunk, bs, c)
    band_rowmax_chunk(band, bc2, rows_out, chunk, c)


@njit(**_SERIAL)
def _band_factor(p, m, band, u, bc1, bc2, eps_eff, tau, neg_lr, wd, write_p, norms_out, removed_out,
                 fallback_out, chunk, c):
    psi = np.empty((m.size, band.shape[1] - 1), dtype=band.dtype)
    t = np.empty(m.size, dtype=band.dtype)
    band_factor_lt_chunk(m, band, psi, t, bc1, bc2, eps_eff, tau, removed_out, fallback_out, chunk, c)
    band_l_apply_chunk(p, psi, t, u, neg_lr, wd, write_p, norms_out, chunk, c)


# ------------------------------------------------ the one-pass driver


def run_blocks(step, p, g, m, band, nu, bsz, small):
    """Block-local SONew on one flat leaf in place; returns ``(removed_edges, fallback_rows)``.

    ``step``: the frozen ``SONewStep``; ``bsz``: the block size (``n`` for whole-tensor
    options the parallel-chunk kernels do not fuse); ``small``: the leaf has ``ndim <= 1``.
    """
    from . import sonew_band_kernels as unrolled
    from . import sonew_block_drivers as drivers
    from .sonew import GRAFT_CODES

    cast = p.dtype.type
    b = band.shape[1] - 1
    n = p.size
    bsz = max(1, min(bsz, n))
    nblocks = (n + bsz - 1) // bsz
    if b in unrolled.STATS_CHUNK:
        kind, saved = str(b), np.zeros((1, b, b + 1), p.dtype)
    else:
        kind, saved = ("diag" if b == 0 else "tri" if b == 1 else "band"), np.zeros(1, p.dtype)
    graft = GRAFT_RMSPROP_NORMALIZED if step.graft == "rmsprop_normalized" else GRAFT_CODES[step.graft]
    nu_view = nu if nu is not None else np.zeros(1, p.dtype)
    removed = np.zeros(nblocks, np.int64)
    fallback = np.zeros(nblocks, np.int64)
    drivers.DRIVERS[kind](p, g, m, band, nu_view, saved, bsz, cast(step.omb1), cast(step.b2),
                cast(step.omb2), cast(step.bc1), cast(step.bc2), cast(step.graft_eps), graft, cast(step.eps),
                cast(step.eps_min), step.relative_eps, cast(step.tau(p.dtype)), cast(-step.lr),
                cast(step.weight_decay), bool(small and step.small_param_fallback == "adam"), removed, fallback,
                np.zeros(nblocks, p.dtype), np.zeros(nblocks), np.zeros(nblocks), np.zeros(nblocks, p.dtype))
    return int(removed.sum()), int(fallback.sum())
