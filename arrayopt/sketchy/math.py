r"""Frequent Directions (FD) sketches of a covariance and their inverse powers (Sketchy).

A rank-``k`` sketch of ``d × d`` PSD statistics is kept in square-root form:
orthonormal ``U ∈ R^{d×k}`` and singular values ``σ̄ ∈ R^k`` with deflated
sketch ``Ḡ = U diag(σ̄²) Uᵀ``, plus the escaped mass ``ρ`` (the *tail*). One
update with new columns ``X ∈ R^{d×m}`` (F1 in ``docs/sketchy.md``):

.. math::
    Z = [\sqrt{β_2}\,U\operatorname{diag}(σ̄),\ X] = u\operatorname{diag}(σ)v^\top
    \quad(\text{thin SVD},\ ZZ^\top = β_2 Ḡ + XX^\top)

    σ_{cut} = σ_{k+1}\ (0 \text{ if } Z \text{ has} \le k \text{ singular values}),\quad
    σ̄' = \sqrt{σ_{1:k}^2 - σ_{cut}^2},\quad U' = u_{:,1:k}\,[σ̄' > 0]

    ρ' = τρ + σ_{cut}^2,\qquad μ = σ_{1:k}^2 + τρ

(values of ``σ_cut`` and ``σ̄'`` below the decomposition's rounding level ``u·max(d, k+m)·σ_1`` count as 0,
and each kept vector is signed so that ``Σ_i U'_{ij}³ > 0``, so every LAPACK gives the same state),
with ``τ = β₂`` (``tail_decay="beta2"``, the paper's exponentially weighted FD,
under which every FD guarantee holds for the β₂-weighted covariance) or
``τ = √β₂`` (``tail_decay="sqrt"``, Google's tearfree Sketchy). ``β₂ = 1`` is the
running sum of the paper's Algorithm 1 (code rank ``k`` = the paper's ``ℓ = k + 1``).
``μ`` are the *undeflated* eigenvalues: ``G̃ = Ḡ' + ρ'I`` has eigenvalue ``μ_j``
along ``U'_j`` and ``ρ'`` on the complement of ``span(U')``. The ``d × d`` sum is
never formed.

The inverse power (F2) of ``G̃ + ε_a I`` applied to ``v`` in ``O(dk)`` per column:

.. math::
    (G̃ + ε_a I)^{-α} v = U\operatorname{diag}(ι - ι_ρ)U^\top v + ι_ρ v,\quad
    ι_j = (μ_j + ε_a)^{-α},\ ι_ρ = (ρ + ε_a)^{-α} \text{ if } ρ > 0 \text{ else } 0

with ``ε_a = ε·max_j μ_j`` (``relative=True``) or ``ε``; directions with a zero
value get a zero inverse (the pseudo-inverse convention).

>>> import numpy as np
>>> from arrayopt.linalg import fd_update, lowrank_apply
>>> U, sv, tail = np.zeros((3, 1)), np.zeros(1), np.zeros(())
>>> s = fd_update(U, sv, tail, np.array([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
>>> np.round(s.sv, 6), float(s.tail), float(s.escaped)
(array([2.236068]), 4.0, 4.0)
>>> np.round(lowrank_apply(s.eigvecs, s.undeflated, s.tail, np.array([1.0, 1.0, 0.0]), alpha=0.5), 6)
array([0.333333, 0.5     , 0.      ])
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import array_api_compat as compat

__all__ = ["FDSketch", "fd_update", "fd_update_stacked", "inverse_factors", "apply_factors",
           "apply_factors_stacked", "lowrank_apply", "TAIL_DECAYS"]

TAIL_DECAYS = ("beta2", "sqrt")


class FDSketch(NamedTuple):
    """The result of :func:`fd_update` (arrays of the inputs' namespace, device and dtype).

    ``eigvecs`` ``U'`` (d×k, zero columns where ``sv`` is 0), ``sv`` ``σ̄'`` (k),
    ``tail`` ``ρ'`` (shape of the input tail), ``undeflated`` ``μ`` (k), ``escaped``
    ``σ_cut²`` (the mass this update removed, ``ρ_t``) and ``ok`` (0-d bool: the
    inputs and the result were finite; when ``False`` the returned sketch is the
    input sketch, ``escaped`` is 0 and ``undeflated`` holds the input's ``σ̄² + ρ``).
    """

    eigvecs: object
    sv: object
    tail: object
    undeflated: object
    escaped: object
    ok: object


def _check_beta2(beta2, tail_decay):
    if isinstance(beta2, bool) or not isinstance(beta2, numbers.Real) or not (0.0 < beta2 <= 1.0):
        raise ValueError(f"beta2: expected a number in (0, 1], got {beta2!r}")
    if tail_decay not in TAIL_DECAYS:
        raise ValueError(f"tail_decay: must be one of {list(TAIL_DECAYS)}, got {tail_decay!r}")


#: NumPy, a ``z`` whose Gram side has at least this many rows: :func:`_top_left_singular_host`
GRAM_MIN_ROWS = 256


def _top_eigh(a, r: int):
    """The top ``r`` eigenpairs ``(w, v)`` of the symmetric ``a`` (ascending), LAPACK ``syevr``."""
    import numpy as np

    n = a.shape[0]
    try:
        from scipy.linalg import eigh

        return eigh(a, subset_by_index=[n - r, n - 1], driver="evr", check_finite=False)
    except ImportError:  # pragma: no cover - scipy comes with the test and demo extras
        w, v = np.linalg.eigh(a)
        return w[n - r:], v[:, n - r:]


def _top_left_singular_host(z, r: int):
    """``(u, σ)`` of the top ``r`` singular triplets of a NumPy ``z`` (d × c) from a Gram matrix
    and LAPACK ``syevr`` restricted to the top ``r`` eigenpairs (F1a in ``docs/sketchy.md``).

    Float64 ``z`` (wide): the float64 Gram ``zzᵀ``. Float32 ``z``: a float32 Gram, ``zzᵀ`` when
    wide, ``zᵀz`` when tall (then ``q = orth(z v)``), followed by a Rayleigh–Ritz step of ``zzᵀ``
    on the found basis ``q``: the eigenpairs of ``(zᵀq)ᵀ(zᵀq)`` (r × r, float64) give ``σ²`` and
    rotate ``q``. Every result is normwise accurate to ``u₃₂‖z‖²`` (as a float32 SVD), and the
    Ritz values recover the relative accuracy of the singular values that the Gram's rounding
    leaves resolved (``σ_j² ≫ u₃₂σ₁²``).
    """
    import numpy as np

    d, c = z.shape
    if z.dtype != np.float32:
        z64 = z.astype(np.float64)
        w, v = _top_eigh(z64 @ z64.T, r)
        s = np.sqrt(np.clip(w[::-1], 0, None))
        return np.ascontiguousarray(v[:, ::-1]).astype(z.dtype), s.astype(z.dtype)
    if c >= d:
        _, q = _top_eigh(z @ z.T, r)
    else:
        _, v = _top_eigh(z.T @ z, r)
        q, _ = np.linalg.qr(z @ v)
    m = (z.T @ q).astype(np.float64)
    w, rot = np.linalg.eigh(m.T @ m)
    s = np.sqrt(np.clip(w[::-1], 0, None))
    u = q @ rot[:, ::-1].astype(np.float32)
    return u, s.astype(np.float32)


def _top_left_singular_stacked(xp, z, r: int):
    """:func:`_top_left_singular_host` of each ``z`` of a stack (``(B, d, c)``) in ``xp`` (torch): the
    same Gram, Rayleigh–Ritz and dtype rules, with a full batched ``eigh`` of which the top ``r``
    pairs are kept (torch has no subset ``eigh``). On 2 cores, float32, top 129 pairs: 25 ms against
    86 ms for a QR of ``zᵀ`` and an SVD of its ``R`` (512 × 4736), 7 against 36 ms (256 × 2432)."""
    def top(a):
        w, v = xp.linalg.eigh(a)
        return xp.flip(w[..., -r:], axis=-1), xp.flip(v[..., -r:], axis=-1)

    zt = xp.matrix_transpose(z)
    if z.dtype != xp.float32:
        z64 = xp.astype(z, xp.float64)
        w, v = top(xp.matmul(z64, xp.matrix_transpose(z64)))
        return xp.astype(v, z.dtype), xp.astype(xp.sqrt(xp.clip(w, min=0.0)), z.dtype)
    if z.shape[2] >= z.shape[1]:
        _, q = top(xp.matmul(z, zt))
    else:
        _, v = top(xp.matmul(zt, z))
        q, _ = xp.linalg.qr(xp.matmul(z, v))
    m = xp.astype(xp.matmul(zt, q), xp.float64)
    w, rot = xp.linalg.eigh(xp.matmul(xp.matrix_transpose(m), m))
    s = xp.sqrt(xp.clip(xp.flip(w, axis=-1), min=0.0))
    u = xp.matmul(q, xp.astype(xp.flip(rot, axis=-1), xp.float32))
    return u, xp.astype(s, xp.float32)


def _gram_route(d: int, c: int, k: int, dtype=None) -> bool:
    """Whether NumPy takes :func:`_top_left_singular_host`: a wide ``z`` with ``d ≥`` :data:`GRAM_MIN_ROWS`,
    or (float32) a tall one with ``c ≥`` :data:`GRAM_MIN_ROWS` (its Gram is ``c × c``)."""
    import numpy as np

    if k >= min(d, c):
        return False
    if c >= d:
        return d >= GRAM_MIN_ROWS
    return dtype == np.float32 and c >= GRAM_MIN_ROWS


def _left_singular(xp, z, k: int):
    """``(u, σ)`` of the thin SVD of each ``z`` of a stack (``(B, d, c)``), σ descending, after a QR
    pre-reduction (every LAPACK call batched over ``B``).

    Tall ``z`` (c < d): ``z = QR``, ``R = u_R σ v``, ``u = Q u_R`` (an SVD of c × c).
    Wide ``z`` (c > d): ``zᵀ = QR``, so ``z = Rᵀ Qᵀ`` and ``u`` is that of ``Rᵀ`` (d × d).
    JAX runs the same NumPy (LAPACK) code on the host through ``jax.pure_callback``: XLA
    compiles a QR and an SVD in about a second per shape, a callback in a few milliseconds.
    NumPy with a Gram side of at least :data:`GRAM_MIN_ROWS` rows takes
    :func:`_top_left_singular_host` (only the top ``k + 1`` pairs) on each ``z`` of the stack.
    """
    b, d, c = (int(n) for n in z.shape)
    if compat.is_jax_namespace(xp):
        import jax
        import numpy as np

        r = k + 1 if _gram_route(d, c, k, np.dtype(z.dtype)) else min(d, c)
        shapes = (jax.ShapeDtypeStruct((b, d, r), z.dtype), jax.ShapeDtypeStruct((b, r), z.dtype))
        return jax.pure_callback(lambda a: _left_singular(np, np.asarray(a), k), shapes, z)
    if compat.is_numpy_namespace(xp) and _gram_route(d, c, k, z.dtype):
        import numpy as np

        pairs = [_top_left_singular_host(z[i], k + 1) for i in range(b)]
        return np.stack([u for u, _ in pairs]), np.stack([s for _, s in pairs])
    if compat.is_torch_namespace(xp):
        import numpy as np

        if _gram_route(d, c, k, np.dtype("float32") if z.dtype == xp.float32 else None):
            return _top_left_singular_stacked(xp, z, k + 1)
    if c < d:
        q, r = xp.linalg.qr(z)
        ur, s, _ = xp.linalg.svd(r, full_matrices=False)
        return xp.matmul(q, ur), s
    if c > d:
        _, r = xp.linalg.qr(xp.matrix_transpose(z))
        z = xp.matrix_transpose(r)
    u, s, _ = xp.linalg.svd(z, full_matrices=False)
    return u, s


def fd_update(eigvecs, sv, tail, x, *, beta2: float = 1.0, tail_decay: str = "beta2") -> FDSketch:
    """One Frequent-Directions update of the sketch ``(U, σ̄, ρ)`` with the columns of ``x`` (F1).

    Args:
      eigvecs: ``U`` (d × k, k ≤ d), orthonormal (or zero) columns; zeros to start.
      sv: ``σ̄`` (k,), square roots of the deflated sketch's eigenvalues.
      tail: ``ρ``, the escaped mass so far (0-d or shape (1,)).
      x: the new data, a vector (d,) or columns (d, m): the covariance gains ``x xᵀ``.
      beta2: decay of the old sketch (``1``: running sum).
      tail_decay: ``"beta2"`` (paper) or ``"sqrt"`` (tearfree) decay of the tail.

    A non-finite ``x`` or state (or a decomposition that overflows) leaves the
    sketch unchanged and returns ``ok = False``; the check costs no host sync.
    A stack of sketches updates in one call with :func:`fd_update_stacked`.
    """
    _check_beta2(beta2, tail_decay)
    xp = compat.array_namespace(eigvecs, sv, tail, x)
    if len(eigvecs.shape) != 2 or sv.shape != (eigvecs.shape[1],):
        raise ValueError(f"eigvecs, sv: expected shapes (d, k) and (k,), got {tuple(eigvecs.shape)} "
                         f"and {tuple(sv.shape)}")
    d, k = eigvecs.shape
    if k > d or k < 1:
        raise ValueError(f"eigvecs: rank k = {k} must be in [1, d = {d}]")
    if len(x.shape) == 1:
        x = x[:, None]
    if len(x.shape) != 2 or x.shape[0] != d:
        raise ValueError(f"x: expected shape ({d},) or ({d}, m), got {tuple(x.shape)}")
    if x.dtype != eigvecs.dtype or sv.dtype != eigvecs.dtype or tail.dtype != eigvecs.dtype:
        raise TypeError("x, sv, tail: dtypes must equal the dtype of eigvecs")
    if tuple(tail.shape) not in ((), (1,)):
        raise ValueError(f"tail: expected shape () or (1,), got {tuple(tail.shape)}")
    s = fd_update_stacked(eigvecs[None, ...], sv[None, :], xp.reshape(tail, (1, 1)), x[None, ...],
                          beta2=beta2, tail_decay=tail_decay)
    tshape = tuple(tail.shape)
    return FDSketch(eigvecs=s.eigvecs[0, ...], sv=s.sv[0, :], tail=xp.reshape(s.tail, tshape),
                    undeflated=s.undeflated[0, :], escaped=xp.reshape(s.escaped, ()), ok=xp.reshape(s.ok, ()))


def fd_update_stacked(eigvecs, sv, tail, x, *, beta2: float = 1.0, tail_decay: str = "beta2",
                      x_finite: bool = False) -> FDSketch:
    """:func:`fd_update` of ``B`` independent sketches of one shape at once (the decompositions
    batched over the leading axis): ``eigvecs`` (B, d, k), ``sv`` (B, k), ``tail`` (B, 1), ``x``
    (B, d, m). Returns an :class:`FDSketch` of stacks (``escaped`` and ``tail`` (B, 1), ``ok`` (B,));
    each sketch's result is the one :func:`fd_update` gives it alone. Shapes are the caller's
    contract (not checked here). ``x_finite=True``: the caller has checked ``x`` (the optimizer's
    gradients), so only the old sketch is checked (two passes over ``x`` saved)."""
    _check_beta2(beta2, tail_decay)
    xp = compat.array_namespace(eigvecs, sv, tail, x)
    _, d, k = (int(n) for n in eigvecs.shape)
    tau = beta2 if tail_decay == "beta2" else math.sqrt(beta2)
    scaled = eigvecs * (sv * math.sqrt(beta2))[:, None, :]
    finite_in = xp.all(xp.isfinite(scaled), axis=(1, 2)) & xp.all(xp.isfinite(tail), axis=1)
    if x_finite:  # never hand non-finite data to the decomposition
        z = xp.concat([xp.where(finite_in[:, None, None], scaled, xp.zeros_like(scaled)), x], axis=2)
    else:
        z = xp.concat([scaled, x], axis=2)
        finite_in = finite_in & xp.all(xp.isfinite(x), axis=(1, 2))
        z = xp.where(finite_in[:, None, None], z, xp.zeros_like(z))
    u, s = _left_singular(xp, z, k)
    top = s[:, :k]
    cut = s[:, k:k + 1] if s.shape[1] > k else xp.zeros_like(s[:, :1])
    # singular values below the rounding level of the decomposition are numerically 0: their
    # vectors are noise, so they are dropped (σ̄ = 0, and a cut at that level escapes nothing),
    # and each kept vector gets a fixed sign (Σ u³ > 0) so that every LAPACK gives the same state
    floor = s[:, :1] * (xp.finfo(s.dtype).eps * max(d, int(z.shape[2])))
    cut = xp.where(cut > floor, cut, xp.zeros_like(cut))
    sv_new = xp.sqrt(xp.clip((top - cut) * (top + cut), min=0.0))
    sv_new = xp.where(sv_new > floor, sv_new, xp.zeros_like(sv_new))
    mask = sv_new > 0
    uk = u[:, :, :k]
    sign = xp.where(xp.sum(uk * uk * uk, axis=1) < 0, -xp.ones_like(top), xp.ones_like(top))
    u_new = xp.where(mask[:, None, :], uk * sign[:, None, :], xp.zeros_like(uk))
    tail_new = tail * tau + cut * cut
    undeflated = top * top + tail * tau
    ok = (finite_in & xp.all(xp.isfinite(u_new), axis=(1, 2)) & xp.all(xp.isfinite(sv_new), axis=1)
          & xp.all(xp.isfinite(tail_new), axis=1))
    old_mu = sv * sv + tail
    ok1, ok2 = ok[:, None], ok[:, None, None]
    return FDSketch(
        eigvecs=xp.where(ok2, u_new, eigvecs),
        sv=xp.where(ok1, sv_new, sv),
        tail=xp.where(ok1, tail_new, tail),
        undeflated=xp.where(ok1, undeflated, old_mu),
        escaped=xp.where(ok1, cut * cut, xp.zeros_like(cut)),
        ok=ok,
    )


def inverse_factors(undeflated, tail, *, alpha: float, eps: float = 0.0, relative: bool = False, mask=None):
    """``(ι, ι_ρ)`` of F2: ``ι_j = (μ_j + ε_a)^{-α}`` (0 where the base is 0 or ``mask`` is False),
    ``ι_ρ = (ρ + ε_a)^{-α}`` if ``ρ > 0`` else 0; ``ε_a = ε·max μ`` when ``relative``.
    A stack (``undeflated`` (B, k), ``tail`` (B, 1)) takes one ``ε_a`` per sketch."""
    xp = compat.array_namespace(undeflated, tail)
    if relative:
        top = xp.max(undeflated, axis=-1, keepdims=True) if len(undeflated.shape) > 1 else xp.max(undeflated)
        eps_a = eps * top
    else:
        eps_a = eps
    base = undeflated + eps_a
    good = base > 0 if mask is None else (base > 0) & mask
    inv = xp.where(good, xp.where(good, base, xp.ones_like(base)) ** (-alpha), xp.zeros_like(base))
    tb = tail + eps_a
    tgood = tail > 0
    inv_tail = xp.where(tgood, xp.where(tgood, tb, xp.ones_like(tb)) ** (-alpha), xp.zeros_like(tb))
    return inv, inv_tail


def apply_factors(xp, eigvecs, inv, inv_tail, v):
    """``U diag(ι - ι_ρ) Uᵀ v + ι_ρ v`` for ``v`` of shape (d,) or (d, c): two skinny GEMMs."""
    vec = len(v.shape) == 1
    if vec:
        v = v[:, None]
    c = xp.matmul(xp.matrix_transpose(eigvecs), v)
    out = xp.matmul(eigvecs, c * (inv - inv_tail)[:, None]) + v * inv_tail
    return out[:, 0] if vec else out


def apply_factors_stacked(xp, eigvecs, inv, inv_tail, v):
    """:func:`apply_factors` of a stack: ``eigvecs`` (B, d, k), ``inv`` (B, k), ``inv_tail`` (B, 1),
    ``v`` (B, d, c); batched GEMMs."""
    c = xp.matmul(xp.matrix_transpose(eigvecs), v)
    return xp.matmul(eigvecs, c * (inv - inv_tail)[:, :, None]) + v * inv_tail[:, :, None]


def lowrank_apply(eigvecs, undeflated, tail, v, *, alpha: float, eps: float = 0.0, relative: bool = False):
    """``(G̃ + ε_a I)^{-α} v`` with ``G̃ = U diag(μ) Uᵀ + ρ (I - UUᵀ)`` in ``O(dk)`` per column (F2).

    ``v`` is a vector (d,) or a batch of columns (d, c) (a mode product of S-Shampoo).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha: expected a finite number, got {alpha!r}")
    xp = compat.array_namespace(eigvecs, undeflated, tail, v)
    if v.shape[0] != eigvecs.shape[0]:
        raise ValueError(f"v: expected {eigvecs.shape[0]} rows like eigvecs, got shape {tuple(v.shape)}")
    inv, inv_tail = inverse_factors(undeflated, tail, alpha=alpha, eps=eps, relative=relative)
    return apply_factors(xp, eigvecs, inv, xp.reshape(inv_tail, ()), v)
