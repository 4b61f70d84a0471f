r"""Per-block Kronecker statistics and their application (pure array-API).

For a block ``G`` of order ``k`` with preconditioned axes ``j`` (``mask``):

.. math::
    F^{(j)} \leftarrow β_2 F^{(j)} + w\, G^{(j)} G^{(j)\top},\quad w = 1 \text{ if } β_2 = 1 \text{ else } 1-β_2

(``G^{(j)}`` the mode-``j`` unfolding; ``β₂ = 1`` is AdaGrad's running sum),
and the direction

.. math::
    D = G \times_1 R^{(1)} \times_2 \cdots \times_k R^{(k)},\qquad R^{(j)} = (F^{(j)} + ε λ_{\max} I)^{-1/p}

computed by contract-and-rotate (axis 0 is always the one processed next;
an unpreconditioned axis is just rotated). For a matrix this is ``R_L G R_R``.
"""

from __future__ import annotations

__all__ = ["contraction", "update_factors", "precondition_block"]


def contraction(xp, g, axis: int):
    """``G^{(axis)} G^{(axis)ᵀ}`` (the mode-``axis`` Gram matrix)."""
    nd = len(g.shape)
    if nd == 1:
        return xp.matmul(g[:, None], g[None, :])
    if nd == 2:
        return xp.matmul(g, xp.matrix_transpose(g)) if axis == 0 else xp.matmul(xp.matrix_transpose(g), g)
    perm = (axis,) + tuple(i for i in range(nd) if i != axis)
    m = xp.reshape(xp.permute_dims(g, perm), (g.shape[axis], -1))
    return xp.matmul(m, xp.matrix_transpose(m))


def update_factors(xp, factors, g, mask, b2: float):
    """New factors of one block (a new list; the old arrays are not written)."""
    w1, w2 = (1.0, 1.0) if b2 == 1.0 else (b2, 1.0 - b2)
    out = []
    j = 0
    for axis, m in enumerate(mask):
        if not m:
            continue
        c = contraction(xp, g, axis)
        f = factors[j]
        out.append(f + c if w1 == 1.0 and w2 == 1.0 else f * w1 + c * w2)
        j += 1
    return out


def precondition_block(xp, g, roots, mask):
    """``G ×_1 R₁ ⋯ ×_k R_k`` over the preconditioned axes (identity on the others)."""
    nd = len(g.shape)
    if nd == 1:
        return xp.matmul(roots[0], g[:, None])[:, 0]
    if nd == 2 and mask == (True, True):
        return xp.matmul(xp.matmul(roots[0], g), roots[1])
    j = 0
    for m in mask:
        if m:
            g = xp.tensordot(g, roots[j], axes=([0], [0]))  # new axis goes last
            j += 1
        else:
            g = xp.permute_dims(g, tuple(range(1, nd)) + (0,))
    return g
