r"""Eigenbases of symmetric PSD factors: exact ``eigh``, or warm-started QR iterations.

Math in ``docs/shampoo.md`` (Q1–Q4). For a factor ``A`` and the
previous basis ``Q`` (orthogonal, columns ordered by decreasing Rayleigh
quotient):

.. math::
    B = Q^\top A Q,\qquad \text{skip if } \lVert B - \operatorname{diag}(B)\rVert_F \le τ \lVert B\rVert_F

otherwise up to ``iterations`` steps of orthogonal (simultaneous) iteration,
``Q ← qr((A + δI) Q)`` with ``R``'s diagonal positive (one QR-algorithm step on
``B``: ``A Q = Q B = Q Q' R'``; the shift ``δ = 4√u‖A‖_F`` keeps the eigenvectors
and bounds the condition number so the QR can be Cholesky QR, see
:func:`orthonormalize`), re-checking the criterion before each step (from the
``A Q`` the step needs: no extra product). The columns are first sorted by decreasing ``diag(B)`` so the
iteration keeps them in place (``perm`` reports that reordering). The eigenvalue
estimates are ``λ = diag(QᵀAQ)``.

``method="eigh"`` (or no previous basis) is LAPACK's ``syevd`` with columns put in
decreasing order. Everything runs on the host in NumPy (LAPACK releases the GIL)
and never raises for numerical failures: a non-finite factor or result is
reported and the caller keeps its previous basis.

>>> import numpy as np
>>> from arrayopt.shampoo.eigenbasis import refresh_eigenbasis
>>> r = refresh_eigenbasis(np.diag([1.0, 3.0]), None, method="eigh")
>>> r.eigenvalues, r.status
(array([3., 1.]), 'ok')
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EigenbasisResult", "refresh_eigenbasis", "off_diagonal_ratio"]


@dataclass(frozen=True)
class EigenbasisResult:
    """One refresh: ``basis`` (``None`` on failure), ``eigenvalues`` (its Rayleigh quotients),
    ``perm`` (new column ``i`` is old column ``perm[i]``; ``None`` when unchanged) and ``status``:
    ``"ok"``, ``"skipped"`` (criterion met, basis kept) or ``"failed"``."""

    basis: np.ndarray | None
    eigenvalues: np.ndarray | None
    perm: np.ndarray | None
    status: str


def off_diagonal_ratio(b: np.ndarray) -> float:
    """``‖B − diag(B)‖_F / ‖B‖_F`` (0 for a zero ``B``)."""
    total = float(np.linalg.norm(b))
    if total == 0.0:
        return 0.0
    off = b - np.diag(np.diagonal(b))
    return float(np.linalg.norm(off)) / total


def _off_diagonal_ratio_orthogonal(a_fro2: float, diag: np.ndarray) -> float:
    """:func:`off_diagonal_ratio` of ``B = QᵀAQ`` for orthogonal ``Q`` from ``‖A‖_F²`` and ``diag(B)``:
    ``‖B‖_F = ‖A‖_F``, so ``‖B − diag(B)‖_F² = ‖A‖_F² − Σ B_ii²`` (no matrix product; the
    subtraction resolves ratios down to about ``√u``, below which the caller forms ``B``)."""
    if a_fro2 == 0.0:
        return 0.0
    return float(np.sqrt(max(a_fro2 - float(np.sum(diag * diag)), 0.0) / a_fro2))


def _eigh_descending(a: np.ndarray):
    w, q = np.linalg.eigh(a)
    return w[::-1].copy(), np.ascontiguousarray(q[:, ::-1])


def _qr_positive(m: np.ndarray) -> np.ndarray:
    q, r = np.linalg.qr(m)
    s = np.sign(np.diagonal(r))
    s[s == 0] = 1
    return q * s


#: below this order the Cholesky factor and the triangular solve call LAPACK / invert directly
_LEAF = 64


def _cholesky(g: np.ndarray, leaf: int = _LEAF) -> np.ndarray:
    """Lower ``L`` with ``g = L Lᵀ`` by 2×2 blocks: ``L₁₁ = chol(G₁₁)``, ``L₂₁ = G₂₁ L₁₁⁻ᵀ``,
    ``L₂₂ = chol(G₂₂ − L₂₁L₂₁ᵀ)`` (matrix products down to ``leaf``-sized blocks). Raises
    ``LinAlgError`` when ``g`` is not positive definite."""
    n = g.shape[0]
    if n <= leaf:
        return np.linalg.cholesky(g)
    h = n // 2
    l11 = _cholesky(g[:h, :h], leaf)
    l21 = _solve_right_lower_transposed(g[h:, :h], l11, leaf)
    out = np.zeros_like(g)
    out[:h, :h] = l11
    out[h:, :h] = l21
    out[h:, h:] = _cholesky(g[h:, h:] - l21 @ l21.T, leaf)
    return out


def _solve_right_lower_transposed(b: np.ndarray, lower: np.ndarray, leaf: int = _LEAF) -> np.ndarray:
    """``X = B L⁻ᵀ`` (``X Lᵀ = B``, ``L`` lower triangular) by blocks, in a copy of ``B``:
    ``X₁ = B₁ L₁₁⁻ᵀ``, ``X₂ = (B₂ − X₁ L₂₁ᵀ) L₂₂⁻ᵀ``."""
    x = np.array(b, copy=True)
    _solve_in_place(x, lower, leaf)
    return x


def _solve_in_place(x: np.ndarray, lower: np.ndarray, leaf: int) -> None:
    n = lower.shape[0]
    if n <= leaf:
        x[...] = x @ np.linalg.inv(lower).T
        return
    h = n // 2
    _solve_in_place(x[:, :h], lower[:h, :h], leaf)
    x[:, h:] -= x[:, :h] @ lower[h:, :h].T
    _solve_in_place(x[:, h:], lower[h:, h:], leaf)


def orthonormalize(w: np.ndarray) -> np.ndarray:
    """``Q`` of ``W = QR`` with ``R``'s diagonal positive, by Cholesky QR (``WᵀW = LLᵀ``,
    ``Q = W L⁻ᵀ``), repeated once on ``Q`` (CholeskyQR2) unless the first ``Q`` is already
    orthonormal to working precision: ``‖QᵀQ − I‖_F ≤ n u``, where the second pass would move
    ``Q`` by less than half a rounding unit per entry (RMS). ``QᵀQ`` is the second pass's Gram
    matrix, so the test costs nothing when the pass runs. Gram matrices are symmetric rank-k
    products, Cholesky factor and triangular solve go by blocks: matrix products, which
    parallelise far better than Householder QR's column panels. Householder QR (signs fixed)
    where the Cholesky factorisation breaks down (``κ(W)² ≳ 1/u``) or gives non-finite values."""
    n = w.shape[1]
    try:
        q = _solve_right_lower_transposed(w, _cholesky(w.T @ w))
        gram = q.T @ q
        gram[np.diag_indices(n)] -= 1
        if not float(np.linalg.norm(gram)) <= n * float(np.finfo(q.dtype).eps):
            gram[np.diag_indices(n)] += 1
            q = _solve_right_lower_transposed(q, _cholesky(gram))
        if np.isfinite(q).all():
            return q
    except np.linalg.LinAlgError:
        pass
    return _qr_positive(w)


def refresh_eigenbasis(a, prev, *, method: str = "qr", iterations: int = 1, tolerance: float = 0.01,
                       compute_dtype: str = "float64", eigenvalues: bool = True) -> EigenbasisResult:
    """A new eigenbasis of symmetric PSD ``a`` (host array), warm-started from ``prev`` for ``"qr"``.

    ``eigenvalues=False`` skips the final ``diag(QᵀAQ)`` after the last QR step (the
    eigenvalue-corrected preconditioner needs only the basis; ``eigenvalues`` is then ``None``).
    """
    dt = np.dtype(compute_dtype)
    a = np.asarray(a, dtype=dt)  # symmetric: eigh reads one triangle, the QR step only multiplies by it
    if not np.isfinite(a).all():
        return EigenbasisResult(None, None, None, "failed")
    try:
        if method == "eigh" or prev is None:
            w, q = _eigh_descending(a)
            perm, status = None, "ok"
        else:
            q = np.asarray(prev, dtype=dt)
            a_fro2 = float(np.vdot(a, a))
            aq = a @ q
            diag = np.einsum("ij,ij->j", q, aq)  # diag(QᵀAQ) without forming B
            order = np.argsort(-diag, kind="stable")
            perm = None
            if np.any(order != np.arange(order.size)):
                # np.take copies whole rows at a time: several times faster than q[:, order]
                perm, q, aq, diag = order, np.take(q, order, axis=1), np.take(aq, order, axis=1), diag[order]
            # (A + δI) has A's eigenvectors and condition number <= 1 + 1/(4√u): CholeskyQR2 stays accurate
            shift = 4.0 * float(np.sqrt(np.finfo(dt).eps)) * float(np.sqrt(a_fro2))
            status = "skipped"
            floor = 16.0 * float(np.sqrt(np.finfo(dt).eps))
            for i in range(iterations):
                ratio = _off_diagonal_ratio_orthogonal(a_fro2, diag)
                if ratio < floor:  # below the cancellation floor of the cheap form: form B
                    ratio = off_diagonal_ratio(q.T @ aq)
                if ratio <= tolerance:
                    break
                status = "ok"
                q = orthonormalize(aq + q * dt.type(shift))
                if i + 1 < iterations or eigenvalues:
                    aq = a @ q
                    diag = np.einsum("ij,ij->j", q, aq)
                else:
                    diag = None
            w = diag
    except np.linalg.LinAlgError:
        return EigenbasisResult(None, None, None, "failed")
    if not (np.isfinite(q).all() and (w is None or np.isfinite(w).all())):
        return EigenbasisResult(None, None, None, "failed")
    return EigenbasisResult(q, w, perm, status)
