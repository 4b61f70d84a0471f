"""Small SONew leaves in one call: diagonal and tridiagonal leaves of one block, by address.

A leaf of fewer than ``SMALL`` entries that fits in one block (``n ≤ block_size``) is stepped by
the block driver as one block: :func:`~.block_kernels.tri_block` (or ``diag_block``) on the whole
leaf. Biases and norms of a real model are such leaves, and one driver call each costs more
than their arithmetic (a Numba call, four views, a parallel launch). Here every such leaf of a
dtype goes into one table (``addrs[j] = (p, g, m, band)`` data addresses, as in ``../_ptrs.py``)
and one serial call runs the same block function on each: the same arithmetic with the same
scalars, so the results are bit-identical to the per-leaf driver's.

Taken: NumPy arrays and torch CPU tensors, C-contiguous, ``band ≤ 1``, any graft but
``"rmsprop_normalized"`` (its per-leaf ``ν`` state stays on the driver).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._common import SERIAL, SMALL
from .._ptrs import address_table, vector
from .block_kernels import diag_block, tri_block

__all__ = ["takes", "run_small"]


@njit(**SERIAL)
def tri_leaves(addrs, sizes, fallback, S, nu, omb1, b2, omb2, bc1, bc2, graft_eps, graft, eps, eps_min, relative,
               tau, neg_lr, wd, removed_out):
    """:func:`tri_block` on every leaf of the table (one block each)."""
    like = bc2
    for j in range(sizes.size):
        n = sizes[j]
        removed_out[j] = tri_block(vector(addrs[j, 0], n, like), vector(addrs[j, 1], n, like),
                                   vector(addrs[j, 2], n, like), vector(addrs[j, 3], 2 * n, like), nu, n, S, omb1,
                                   b2, omb2, bc1, bc2, graft_eps, graft, eps, eps_min, relative, tau, neg_lr, wd,
                                   fallback[j] != 0)


@njit(**SERIAL)
def diag_leaves(addrs, sizes, fallback, S, nu, omb1, b2, omb2, ibc1, ibc2, graft_eps, graft, eps, eps_min, relative,
                neg_lr, wd, removed_out):
    """``diag_block`` on every leaf of the table (one block each)."""
    like = ibc2
    for j in range(sizes.size):
        n = sizes[j]
        removed_out[j] = diag_block(vector(addrs[j, 0], n, like), vector(addrs[j, 1], n, like),
                                    vector(addrs[j, 2], n, like), vector(addrs[j, 3], n, like), nu, n, S, omb1, b2,
                                    omb2, ibc1, ibc2, graft_eps, graft, eps, eps_min, relative, neg_lr, wd,
                                    fallback[j] != 0)


def _address(a, lib) -> int:
    return a.data_ptr() if lib == "torch" else a.__array_interface__["data"][0]


def takes(step, leaf, arrays, band, lib) -> bool:
    """Whether a leaf goes to the table: one block of fewer than ``SMALL`` entries on the block
    driver, ``band ≤ 1``, its arrays C-contiguous and read in C order, no ``ν`` state."""
    n = band.shape[0]
    if n == 0 or n >= SMALL or band.shape[1] > 2 or step.graft == "rmsprop_normalized":
        return False
    small = len(tuple(leaf.shape)) <= 1
    if step.order == "F" and not small:
        return False  # read in F order: the driver's copies
    if not (step.block_size is not None or (small and step.small_param_fallback != "sonew")):
        return False  # the whole-tensor kernels take it
    if step.block_size is not None and n > step.block_size:
        return False
    for a in arrays:  # a loop: all() over a generator costs a leaf more
        if not (a.is_contiguous() if lib == "torch" else a.flags.c_contiguous):
            return False
    return True


def run_small(step, lib, rows_by_dtype) -> dict:
    """Every table of ``rows_by_dtype`` (``{numpy dtype: [(leaf index, leaf, p, g, m, band)]}``) in one
    call each; returns ``{leaf index: (removed_edges, fallback_rows)}``."""
    out = {}
    for dt, rows in rows_by_dtype.items():
        cast = dt.type
        b = rows[0][5].shape[1] - 1
        addrs, sizes = address_table([(int(band.shape[0]), _address(p, lib), _address(g, lib), _address(m, lib),
                                       _address(band, lib)) for _, _, p, g, m, band in rows])
        fallback = np.array([len(tuple(leaf.shape)) <= 1 and step.small_param_fallback == "adam"
                             for _, leaf, *_ in rows], dtype=np.int8)
        removed = np.zeros(len(rows), np.int64)
        nu = np.zeros(1, dt)
        smax = int(sizes.max())
        common = (cast(step.graft_eps), step.graft_code, cast(step.eps), cast(step.eps_min), step.relative_eps)
        tail = (cast(-step.lr), cast(step.weight_decay), removed)
        if b == 0:
            diag_leaves(addrs, sizes, fallback, np.empty((4, smax), dt), nu, cast(step.omb1), cast(step.b2),
                        cast(step.omb2), cast(1.0 / step.bc1), cast(1.0 / step.bc2), *common, *tail)
        else:
            tri_leaves(addrs, sizes, fallback, np.empty((7, smax), dt), nu, cast(step.omb1), cast(step.b2),
                       cast(step.omb2), cast(step.bc1), cast(step.bc2), *common, cast(step.tau(dt)), *tail)
        for (i, *_), r in zip(rows, removed):
            out[i] = (int(r), int(r))
    return out
