"""SONew on the Numba backend (op ``"sonew"``): every graft and fallback, any band, whole-tensor
and block-local, flatten orders C and F.

``states = [mus, bands]`` (``[mus, bands, graft_nus]`` with ``graft="rmsprop_normalized"``),
``step`` a ``SONewStep``; returns per leaf ``(removed_edges, fallback_rows)``. A leaf takes
the whole-tensor kernels (``whole.py``) unless ``block_size`` is set or an option only the
block driver fuses is on (``graft="rmsprop_normalized"``, ``small_param_fallback="adam"`` on a
tensor with ``ndim <= 1``): then the block driver (``blocks.py``; one block of ``n`` without
``block_size``).

Modules, each importing only those listed after it:

- ``__init__``: ``OPS`` and :func:`run` (views, the F-order copies, the choice per leaf);
- ``whole.py``: the whole-tensor step of one leaf; ``blocks.py``: the block-local step;
- ``_gen_block_drivers.py`` (generated): block drivers for bands ``b >= 2``;
- ``block_kernels.py``: the fused diagonal/tridiagonal blocks and the generic band's adapters;
- ``_gen_band_kernels.py`` (generated): kernels unrolled for ``2 <= b <= 8``;
- ``band.py`` (any ``b``), ``diag_tri.py`` (``b = 0, 1``): the whole-tensor kernels;
- ``grafts.py``: the graft codes of ``arrayopt.sonew.step.GRAFT_CODES``;
- ``../_common.py``: compile flags and reductions.

``codegen.py`` writes the two ``_gen_*`` modules (``python -m arrayopt.backends.numba_cpu.sonew.codegen``).
"""

from __future__ import annotations

import numpy as np

from arrayopt._xp import library_of

from .blocks import run_blocks
from .whole import step_leaf

__all__ = ["OPS", "run"]

#: every option of the step description is fused (bands ``b <= 8`` unrolled, larger generic)
OPS = {"sonew": {}}

_BAND_LAYOUT = "SONew band state: expected a C-contiguous (n, b+1) array"


def run(backend, op, params, grads, states, step, g_views=None) -> list:
    """One SONew step on every leaf, in place; returns ``[(removed_edges, fallback_rows)]`` per leaf.

    ``step``: the frozen ``arrayopt.sonew.step.SONewStep`` of this step (hyperparameters,
    ``lr``, ``bc1``, ``bc2``); nothing is read from the optimizer. Every scratch array is
    allocated by the drivers, per call: two threads stepping at once (the kernels release
    the GIL) never share one.
    """
    mus, bands = states[0], states[1]
    nus = states[2] if len(states) > 2 else None
    p_views = backend.views(params)
    g_views = list(g_views) if g_views is not None else backend.views(grads)
    m_views = backend.views(mus)
    nu_views = backend.views(nus) if nus is not None else [None] * len(p_views)
    b_views = [(bd.detach().numpy() if library_of(bd) == "torch" else bd) for bd in bands]
    write_back = []
    if step.order == "F":  # flatten_order="F": the band runs over the first axis fastest
        for i, leaf in enumerate(params):
            shape = tuple(leaf.shape)
            if len(shape) > 1:
                p_nd, m_nd = p_views[i].reshape(shape), m_views[i].reshape(shape)
                p_views[i], m_views[i] = np.ravel(p_nd, order="F"), np.ravel(m_nd, order="F")
                g_views[i] = np.ravel(g_views[i].reshape(shape), order="F")
                write_back.append((p_nd, p_views[i]))
                write_back.append((m_nd, m_views[i]))
                if nu_views[i] is not None:
                    nu_nd = nu_views[i].reshape(shape)
                    nu_views[i] = np.ravel(nu_nd, order="F")
                    write_back.append((nu_nd, nu_views[i]))
    out = []
    for leaf, p, g, m, band, nu in zip(params, p_views, g_views, m_views, b_views, nu_views):
        if not band.flags.c_contiguous:
            raise ValueError(_BAND_LAYOUT)
        small = len(tuple(leaf.shape)) <= 1
        if (step.block_size is not None or step.graft == "rmsprop_normalized"
                or (small and step.small_param_fallback != "sonew")):
            # block-local (or an option only the block driver fuses: one block of n)
            bsz = p.size if step.block_size is None else step.block_size
            out.append(run_blocks(step, p, g, m, band, nu, bsz, small))
        else:
            out.append(step_leaf(step, p, g, m, band))
    for x_nd, x_f in write_back:
        x_nd[...] = x_f.reshape(x_nd.shape, order="F")
    return out
