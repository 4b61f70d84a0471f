r"""Eigenvalue-corrected Shampoo's elementwise step on the Numba backend.

The rotations ``Ĝ = G ×_j Q_jᵀ`` and back are matrix products through the namespace
(BLAS); between them one pass per block (:func:`corrected_moment`) updates the second
moment ``D`` in the eigenbasis in place and overwrites ``Ĝ`` with the scaled step, in
the reference's order of operations
(:func:`arrayopt.shampoo.math.corrected_moment`):

.. math::
    D ← w_1 D + w_2 Ĝ^{∘2},\qquad X = Ĝ / (\sqrt{c D} + ε)

Scalars arrive typed as the block (no float64 promotion of float32 math).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import OPTS, SERIAL, SMALL, renamed

__all__ = ["OPS", "run"]

#: eigenvalue-corrected Shampoo: the eigenbasis second moment and scaled step, any β (1: running sum)
OPS = {"shampoo_corrected": {}}


def corrected_moment(x, d, decay, weight, inv_bias, eps):
    for i in prange(x.size):
        gi = x[i]
        di = d[i] * decay + (gi * gi) * weight
        d[i] = di
        x[i] = gi / (np.sqrt(di * inv_bias) + eps)


_MOMENT = {True: njit(**OPTS)(renamed(corrected_moment, "_parallel")),
           False: njit(**SERIAL)(renamed(corrected_moment, "_serial"))}


def _contiguous(a):
    """``a`` if it is a C-contiguous writeable NumPy array or contiguous torch CPU tensor, else a copy."""
    if isinstance(a, np.ndarray):
        return a if a.flags.c_contiguous and a.flags.writeable else np.array(a, order="C")
    return a if a.is_contiguous() else a.contiguous()


def run(backend, op, rotated, grads, states, step, g_views=None) -> list:
    """``step`` (a ``CorrectedMomentStep``) on each block in place: ``states = [moments]``, ``moments[i]``
    (``D``, C-contiguous and writeable, as :meth:`refuse_arrays` checked) updated, ``rotated[i]``
    (``Ĝ``, a fresh product of the caller's, in the params' place) overwritten with ``X``; ``grads``
    unused. Returns the ``X`` arrays (``Ĝ`` itself, or its contiguous copy)."""
    out = []
    for gh, d in zip(rotated, states[0]):
        gh = _contiguous(gh)
        x, dv = backend.views([gh, d])
        cast = x.dtype.type
        _MOMENT[x.size >= SMALL](x, dv, cast(step.decay), cast(step.weight), cast(step.inv_bias), cast(step.eps))
        out.append(gh)
    return out
