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

__all__ = ["contraction", "update_factors", "precondition_block", "rotate_block", "corrected_moment"]


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


def update_factors(xp, factors, g, mask, b2: float, contract=None):
    """New factors of one block (a new list; the old arrays are not written). ``contract``: the
    per-axis contraction ``G_(i) G_(i)ᵀ`` (default :func:`contraction`; stacked blocks pass theirs)."""
    contract = contract or contraction
    w1, w2 = (1.0, 1.0) if b2 == 1.0 else (b2, 1.0 - b2)
    out = []
    j = 0
    for axis, m in enumerate(mask):
        if not m:
            continue
        c = contract(xp, g, axis)  # a new array: updated in place (the values of f·w₁ + c·w₂)
        f = factors[j]
        if not (w1 == 1.0 and w2 == 1.0):
            c *= w2
            f = f * w1
        c += f
        out.append(c)
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


def rotate_block(xp, g, bases, mask, *, back: bool = False):
    """``Ĝ = G ×_1 Q₁ᵀ ⋯ ×_k Q_kᵀ`` into the eigenbases (``back=True``: ``G ×_j Q_j``, the inverse)."""
    nd = len(g.shape)
    if nd == 1:
        q = bases[0]
        return xp.matmul(q, g[:, None])[:, 0] if back else xp.matmul(g[None, :], q)[0, :]
    if nd == 2 and mask == (True, True):
        ql, qr = bases
        if back:
            return xp.matmul(xp.matmul(ql, g), xp.matrix_transpose(qr))
        return xp.matmul(xp.matmul(xp.matrix_transpose(ql), g), qr)
    if nd == 2 and mask == (False, True):  # one-sided: one product, no transposed copies
        return xp.matmul(g, xp.matrix_transpose(bases[0]) if back else bases[0])
    if nd == 2 and mask == (True, False):
        return xp.matmul(bases[0] if back else xp.matrix_transpose(bases[0]), g)
    j = 0
    for m in mask:
        if m:
            g = xp.tensordot(g, bases[j], axes=([0], [1 if back else 0]))  # new axis goes last
            j += 1
        else:
            g = xp.permute_dims(g, tuple(range(1, nd)) + (0,))
    return g


def corrected_moment(xp, gh, second_moment, step):
    """``(X, D_new)`` of :class:`arrayopt.shampoo.step.CorrectedMomentStep`:
    ``D_new = w₁ D + w₂ Ĝ²``, ``X = Ĝ / (√(c D_new) + ε)`` (the reference of the fused kernels)."""
    d_new = second_moment * step.decay + (gh * gh) * step.weight
    return gh / (xp.sqrt(d_new * step.inv_bias) + step.eps), d_new
