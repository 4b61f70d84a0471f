"""SONew on the Numba backend (op ``"sonew"``): every graft and fallback, any band, whole-tensor
and block-local, flatten orders C and F.

``states = [mus, bands]`` (``[mus, bands, graft_nus]`` with ``graft="rmsprop_normalized"``),
``step`` a ``SONewStep``; returns per leaf ``(removed_edges, fallback_rows)``. A leaf takes
the whole-tensor kernels (``whole.py``) unless ``block_size`` is set or an option only the
block driver fuses is on (``graft="rmsprop_normalized"``, ``small_param_fallback="adam"`` on a
tensor with ``ndim <= 1``): then the block driver (``blocks.py``; one block of ``n`` without
``block_size``).

Modules, each importing only those listed after it:

- ``__init__``: ``OPS`` and :func:`run` (views, the F-order and C-order copies, the choice per leaf);
- ``small_leaves.py``: the small diagonal/tridiagonal leaves of one block, one call per dtype;
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
from .small_leaves import run_small, takes
from .whole import step_leaf

__all__ = ["OPS", "run"]

#: every option of the step description is fused (bands ``b <= 8`` unrolled, larger generic)
OPS = {"sonew": {}}

#: the band couples neighbours in the logical C order of the shape (``flatten_order="F"``: the
#: first axis fastest), whatever the memory layout: a leaf laid out otherwise (a ``channels_last``
#: conv weight) is copied to that order for the kernels and its params and state copied back
LAYOUT = "copy"

_BAND_LAYOUT = "SONew band state: expected a C-contiguous (n, b+1) array"
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def run(backend, op, params, grads, states, step, g_views=None) -> list:
    """One SONew step on every leaf, in place; returns ``[(removed_edges, fallback_rows)]`` per leaf.

    ``step``: the frozen ``arrayopt.sonew.step.SONewStep`` of this step (hyperparameters,
    ``lr``, ``bc1``, ``bc2``); nothing is read from the optimizer. Every scratch array is
    allocated by the drivers, per call: two threads stepping at once (the kernels release
    the GIL) never share one.
    """
    mus, bands = states[0], states[1]
    nus = states[2] if len(states) > 2 else None
    lib = library_of(params[0])
    done = _small_leaves(step, lib, params, grads, mus, bands) if nus is None else {}
    rest = [i for i in range(len(params)) if i not in done]
    if not rest:
        return [done[i] for i in range(len(params))]
    params, grads, mus = [params[i] for i in rest], [grads[i] for i in rest], [mus[i] for i in rest]
    bands = [bands[i] for i in rest]
    p_views = list(backend.views(params))
    g_views = list(backend.views(grads)) if done or g_views is None else list(g_views)
    m_views = list(backend.views(mus))
    nu_views = list(backend.views(nus)) if nus is not None else [None] * len(p_views)
    b_views = [(bd.detach().numpy() if lib == "torch" else bd) for bd in bands]
    write_back = []
    for i, leaf in enumerate(params):
        order = _band_order(step, [leaf, grads[i], mus[i]] + ([nus[i]] if nus is not None else []), lib)
        if order is None:
            continue
        p_views[i] = _logical(leaf, lib, order, write_back)
        g_views[i] = _logical(grads[i], lib, order, None)
        m_views[i] = _logical(mus[i], lib, order, write_back)
        if nus is not None:
            nu_views[i] = _logical(nus[i], lib, order, write_back)
    out = []
    for leaf, p, g, m, band, nu in zip(params, p_views, g_views, m_views, b_views, nu_views):
        if not band.flags.c_contiguous:
            raise ValueError(_BAND_LAYOUT)
        small = len(tuple(leaf.shape)) <= 1
        b_eff = step.effective_band(p.size)
        if b_eff < band.shape[1] - 1:  # a band wider than the leaf (block): the step of band b_eff
            full, band = band, np.ascontiguousarray(band[:, :b_eff + 1])
            write_back.append((full[:, :b_eff + 1], band, "C"))
            rest = full[:, b_eff + 1:]
            rest *= rest.dtype.type(step.b2)
        if (step.block_size is not None or step.graft == "rmsprop_normalized"
                or (small and step.small_param_fallback != "sonew")):
            # block-local (or an option only the block driver fuses: one block of n)
            bsz = p.size if step.block_size is None else step.block_size
            out.append(run_blocks(step, p, g, m, band, nu, bsz, small))
        else:
            out.append(step_leaf(step, p, g, m, band))
    for x_nd, x_f, order in write_back:
        x_nd[...] = x_f.reshape(x_nd.shape, order=order)
    if not done:
        return out
    done.update(zip(rest, out))
    return [done[i] for i in range(len(done))]


def _small_leaves(step, lib, params, grads, mus, bands) -> dict:
    """The leaves :func:`small_leaves.takes` in one call per dtype: ``{leaf index: counts}``."""
    table: dict = {}
    for i, leaf in enumerate(params):
        arrays = (leaf, grads[i], mus[i], bands[i])
        if takes(step, leaf, arrays, bands[i], lib):
            dt = _F32 if leaf.itemsize == 4 else _F64  # float32/float64 (the backend refuses others)
            table.setdefault(dt, []).append((i, *arrays[:1], *arrays))
    return run_small(step, lib, table) if table else {}


def _nd(a, lib):
    return a.detach().numpy() if lib == "torch" else a


def _band_order(step, arrays, lib):
    """``None`` when the flat storage views of a leaf's ``arrays`` (param, grad, state) are in the
    band's order (all C-contiguous, order C); else the order (``"C"`` or ``"F"``) they are read in."""
    if step.order == "F" and len(tuple(arrays[0].shape)) > 1:
        return "F"
    if lib == "torch":
        return None if all(a.is_contiguous() for a in arrays) else "C"
    return None if all(a.flags.c_contiguous for a in arrays) else "C"


def _logical(a, lib, order, write_back):
    """The flat vector of ``a`` in the band's order: a view when ``a`` is laid out so, else a copy
    (recorded in ``write_back`` to be copied back after the step)."""
    nd = _nd(a, lib)
    flat = np.ravel(nd, order=order)
    if write_back is not None and not np.shares_memory(flat, nd):
        write_back.append((nd, flat, order))
    return flat
