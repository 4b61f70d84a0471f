r"""Banded LogDet (SONew) factor and apply, as pure array-API functions.

Given the band of a symmetric positive-definite matrix ``H`` (only the band is
ever used), the LogDet problem

.. math::
    X^\star = \arg\min_{X \in S_n(G_b),\ X \succ 0}\ -\log\det X + \operatorname{tr}(X H)

over matrices with half-bandwidth ``b`` has the closed form ((S4) in ``docs/sonew.md``)
``X = L D Lᵀ`` with ``L`` unit lower-triangular, ``L_{j+k, j} = -ψ_j[k]`` and
``D = diag(1/s)``, where for every row ``j`` with ``I_j = {j+1, …, min(j+b, n-1)}``

.. math::
    ψ_j = H_{I_j I_j}^{-1} H_{I_j j},\qquad s_j = H_{jj} - H_{j I_j} ψ_j .

Equivalently ``(X⁻¹)_{ij} = H_{ij}`` on the band (``X⁻¹`` is the max-determinant
completion of the band of ``H``).

Storage: ``h`` has shape ``(n, b+1)`` with ``h[i, k] = H[i, i+k]`` (entries with
``i + k >= n`` are ignored); ``psi`` has shape ``(n, b)`` with ``psi[j, k-1] = ψ_j[k]``
(zero where ``j + k >= n``); ``s`` has shape ``(n,)``.

All ``n`` small ``b×b`` systems are solved at once: an unpivoted ``LDLᵀ`` of the
windows, vectorised over the rows, ``b`` elimination steps of whole-vector
operations (no batched LAPACK call is needed, so every array-API namespace
works). Tridiagonal (``b = 1``) reduces to two vector operations:
``ψ_j = H_{j,j+1}/H_{j+1,j+1}``, ``s_j = H_{jj} - H_{j,j+1} ψ_j``.

:func:`sonew_factor` is the exact closed form. The stability rule of the
optimizer ((S7): keep, per row, the first ``k`` neighbours whose Schur
complements stay above ``τ·H_jj``; for ``b = 1`` this is edge removal) is
:func:`sonew_factor_guarded`, which with no row triggering returns bit for bit
what :func:`sonew_factor` returns. It works because, with ``A = L_A D_A L_Aᵀ``
the window and ``z = L_A⁻¹ H_{I_j j}``, the Schur complement with only the
first ``k`` neighbours is ``s_j^{(k)} = H_jj - Σ_{i<k} z_i² / d_i``: one
factorisation gives every bandwidth at once.

>>> import numpy as np
>>> from arrayopt.linalg import sonew_factor, sonew_apply
>>> H = np.array([[2., 1., 0.], [1., 2., 1.], [0., 1., 2.]])
>>> h = np.array([[2., 1.], [2., 1.], [2., 0.]])       # h[i, k] = H[i, i+k]
>>> psi, s = sonew_factor(h)
>>> X_v = sonew_apply(psi, s, np.array([1., 0., 0.]))  # first column of X
>>> np.round(X_v, 6).tolist()                            # (X⁻¹ = H on the band)
[0.666667, -0.333333, 0.0]
"""

from __future__ import annotations

import array_api_compat as compat

__all__ = ["sonew_factor", "sonew_apply", "sonew_factor_guarded", "band_outer", "band_rowsums",
           "band_rowsum_max"]


def _xp(*arrays):
    return compat.array_namespace(*arrays)


def _zeros(xp, n, like):
    return xp.zeros((n,), dtype=like.dtype, device=compat.device(like))


def shift_up(xp, x, k: int):
    """``y[j] = x[j + k]`` (zero past the end)."""
    n = x.shape[0]
    if k >= n:
        return _zeros(xp, n, x)
    return xp.concat([x[k:], _zeros(xp, k, x)])


def shift_down(xp, x, k: int):
    """``y[j] = x[j - k]`` (zero before the start)."""
    n = x.shape[0]
    if k >= n:
        return _zeros(xp, n, x)
    return xp.concat([_zeros(xp, k, x), x[: n - k]])


def _check_band(h):
    if len(h.shape) != 2 or h.shape[1] < 1:
        raise ValueError(f"h: expected shape (n, b+1) with b >= 0, got {tuple(h.shape)}")
    if h.shape[0] < 1:
        raise ValueError("h: expected at least one row")


def _masked(xp, h):
    """``h`` with the entries past ``n`` (``i + k >= n``) set to zero."""
    n, bp1 = h.shape
    dev = compat.device(h)
    i = xp.reshape(xp.arange(n, device=dev), (n, 1))
    k = xp.reshape(xp.arange(bp1, device=dev), (1, bp1))
    return xp.where(i + k < n, h, xp.zeros_like(h))


def _factor(xp, h, tau):
    """The factor with per-row bandwidths: ``(psi, s, kept)``; ``tau=None`` is the exact form.

    ``kept`` (int64-like, shape (n,)) is how many neighbours each row kept
    (``None`` when ``tau`` is None).
    """
    n, bp1 = h.shape
    b = bp1 - 1
    hm = _masked(xp, h)
    d0 = hm[:, 0]
    if b == 0:
        psi = xp.zeros((n, 0), dtype=h.dtype, device=compat.device(h))
        kept = None if tau is None else xp.zeros((n,), dtype=xp.int64, device=compat.device(h))
        return psi, d0, kept
    dev = compat.device(h)
    # padded band: b extra rows with H_ii = 1 and no couplings, so every row has a full window
    pad = xp.concat([xp.ones((b, 1), dtype=h.dtype, device=dev),
                     xp.zeros((b, b), dtype=h.dtype, device=dev)], axis=1)
    hp = xp.concat([hm, pad], axis=0)

    def A(a, c):  # window entry H[j+1+a, j+1+c] for all rows j (a, c in 0..b-1)
        if a > c:
            a, c = c, a
        return hp[1 + a: 1 + a + n, c - a]

    L = [[None] * b for _ in range(b)]   # L[r][i], r > i: unit lower factor of the window
    d = [None] * b
    ok = [None] * b
    for i in range(b):
        aii = A(i, i)
        di = aii
        for l_ in range(i):
            di = di - L[i][l_] * (L[i][l_] * d[l_])
        if tau is not None:
            ok[i] = di > tau * aii
            di = xp.where(ok[i], di, aii)  # keep everything finite; rows cut before i anyway
        d[i] = di
        for r in range(i + 1, b):
            w = A(r, i)
            for l_ in range(i):
                w = w - L[r][l_] * (L[i][l_] * d[l_])
            L[r][i] = w / di
    # forward substitution z = L⁻¹ r, w = D⁻¹ z, prefix Schur complements
    z = [None] * b
    wv = [None] * b
    s = d0
    alive = None
    kept = None
    for i in range(b):
        zi = hm[:, i + 1]
        for l_ in range(i):
            zi = zi - L[i][l_] * z[l_]
        z[i] = zi
        wi = zi / d[i]
        s_next = s - zi * wi
        if tau is None:
            s = s_next
        else:
            good = ok[i] & (s_next > tau * d0)
            alive = good if alive is None else (alive & good)
            s = xp.where(alive, s_next, s)
            wi = xp.where(alive, wi, xp.zeros_like(wi))
            a_int = xp.astype(alive, xp.int64)
            kept = a_int if kept is None else kept + a_int
        wv[i] = wi
    # back substitution psi = L⁻ᵀ w (w is zero past each row's kept width)
    psi = [None] * b
    for i in range(b - 1, -1, -1):
        pi = wv[i]
        for r in range(i + 1, b):
            pi = pi - L[r][i] * psi[r]
        psi[i] = pi
    psi = xp.stack(psi, axis=1)
    # zero ψ_j[k] for j + k >= n (these are exactly zero in exact arithmetic already)
    psi = _masked(xp, xp.concat([xp.zeros((n, 1), dtype=h.dtype, device=dev), psi], axis=1))[:, 1:]
    return psi, s, kept


def sonew_factor(h):
    """The factor ``(psi, s)`` of the LogDet-optimal banded ``X = L D Lᵀ`` (exact closed form).

    ``h``: shape ``(n, b+1)``, ``h[i, k] = H[i, i+k]``. Needs every ``(b+1)``-window
    of ``H`` positive definite (then every ``s_j > 0``). No stability rule is
    applied; see :func:`sonew_factor_guarded`.
    """
    _check_band(h)
    xp = _xp(h)
    psi, s, _ = _factor(xp, h, None)
    return psi, s


def sonew_factor_guarded(h, tau: float):
    """Factor with the per-row bandwidth fallback (S7); returns ``(psi, s, kept)``.

    Row ``j`` keeps its first ``k`` neighbours, ``k`` the largest with every
    window pivot ``d_i > τ·A_ii`` and every prefix Schur complement
    ``s_j^{(i)} > τ·H_jj`` for ``i <= k``; ``k = 0`` gives ``s_j = H_jj``. So
    ``s > 0`` whenever ``H_jj > 0``. For ``b = 1`` this is tridiagonal edge removal
    (drop edge ``(j, j+1)`` where ``s_j <= τ H_jj``), whose result is the exact
    solution on the pruned graph. ``kept[j]`` counts padded (non-existent)
    neighbours past ``n`` as kept.
    """
    _check_band(h)
    xp = _xp(h)
    psi, s, kept = _factor(xp, h, float(tau))
    return psi, s, kept


def sonew_apply(psi, s, v):
    """``X v`` for ``X = L D Lᵀ`` given by ``(psi, s)``, in O(n b) without forming ``X``.

    ``u = Lᵀ v``: ``u_j = v_j - Σ_k ψ_j[k] v_{j+k}``; ``u ← u / s``;
    ``y = L u``: ``y_j = u_j - Σ_k ψ_{j-k}[k] u_{j-k}``.
    """
    xp = _xp(psi, s, v)
    if len(psi.shape) != 2 or psi.shape[0] != s.shape[0] or tuple(v.shape) != tuple(s.shape):
        raise ValueError(f"psi, s, v: expected shapes (n, b), (n,), (n,), got "
                         f"{tuple(psi.shape)}, {tuple(s.shape)}, {tuple(v.shape)}")
    b = psi.shape[1]
    u = v
    for k in range(1, b + 1):
        u = u - psi[:, k - 1] * shift_up(xp, v, k)
    u = u / s
    y = u
    for k in range(1, b + 1):
        y = y - shift_down(xp, psi[:, k - 1] * u, k)
    return y


def band_outer(g, b: int):
    """The band of ``g gᵀ``: shape ``(n, b+1)``, ``[i, k] = g_i g_{i+k}`` (zero past ``n``)."""
    xp = _xp(g)
    return xp.stack([g * shift_up(xp, g, k) for k in range(b + 1)], axis=1)


def band_rowsums(h):
    """``r_i = Σ_j |H_ij|`` over the band, shape ``(n,)``.

    Each row is summed in one fixed order, ``|H_ii|``, then ``|H_{i,i+k}|`` and
    ``|H_{i,i-k}|`` for ``k = 1..b``, one addition at a time, as every kernel does:
    ``xp.sum(a, axis=1)`` would leave the order to the library (NumPy sums rows of
    eight or more entries pairwise), and the relative ε built from these sums
    would then differ in its last bit between namespaces and backends.
    """
    xp = _xp(h)
    a = xp.abs(_masked(xp, h))
    r = a[:, 0]
    for k in range(1, h.shape[1]):
        r = r + a[:, k]
    for k in range(1, h.shape[1]):
        r = r + shift_down(xp, a[:, k], k)
    return r


def band_rowsum_max(h):
    """``max_i Σ_j |H_ij|`` over the band (the ∞-norm of the banded symmetric matrix);
    the rows summed as in :func:`band_rowsums`."""
    xp = _xp(h)
    return xp.max(band_rowsums(h))
