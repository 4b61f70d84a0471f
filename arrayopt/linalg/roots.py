r"""Inverse p-th roots of symmetric PSD matrices (Shampoo's preconditioners).

.. math::
    \operatorname{root}(A) = (A + ε\,λ_{\max}(A)\,I)^{-1/p}

with a *relative* ridge ``ε·λmax`` (``relative=True``, the JAX convention: the
result is covariant under scaling, ``root(cA) = c^{-1/p} root(A)``, and the
damped matrix has condition number at most ``1 + 1/ε``) or an absolute one
(``relative=False``: ``A + ε I``). A zero matrix (``λmax = 0``) with a relative
ridge has no scale: its root is defined as the identity.

Two methods:

- ``method="eigh"`` (default): ``A = Q diag(λ) Qᵀ`` on the host (LAPACK ``syevd``,
  which releases the GIL: NumPy's, or torch's for torch tensors, see
  :mod:`arrayopt.linalg.host_lapack`) in ``compute_dtype`` (float64 by
  default, float32 allowed); eigenvalues below 0 (round-off) are clipped to 0;
  ``root = Q diag((λ + ridge)^{-1/p}) Qᵀ`` is symmetric by construction.
- ``method="newton"``: the coupled Newton (Schur–Newton) iteration of Guo &
  Higham (2006), run in ``A``'s own namespace and device: with
  ``Ā = A + ridge·I``, ``z = (1+p)/(2‖Ā‖_F)``, ``M₀ = zĀ``, ``H₀ = z^{1/p} I``::

      T = ((p+1) I - M) / p;   M ← T^p M;   H ← H T;   e = max|M - I|

  until ``e ≤ error_tolerance`` or the error grows by 1.2x (then the previous
  iterate is kept) or ``max_iterations``. ``λmax`` comes from a power
  iteration. A root whose final error exceeds ``failure_threshold`` or that is
  not finite falls back to ``eigh`` (counted in ``info["fallbacks"]``).

Inputs may be batched over leading dimensions (``A.shape == (..., n, n)``).
The result has ``A``'s namespace, device and dtype.

>>> import numpy as np
>>> from arrayopt.linalg import inverse_pth_root
>>> A = np.diag([4.0, 16.0])
>>> np.round(inverse_pth_root(A, 2, ridge_epsilon=0.0), 6)
array([[0.5 , 0.  ],
       [0.  , 0.25]])
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .._xp import Namespace, device_of, dtype_name, library_of, namespace_of, to_numpy
from . import host_lapack

__all__ = ["inverse_pth_root", "inverse_pth_root_info", "power_iteration", "host_inverse_pth_roots",
           "eigh_inverse_pth_root"]

_METHODS = ("eigh", "newton")
_COMPUTE = ("float64", "float32")


def _check_args(p, ridge_epsilon, method, compute_dtype):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"p: expected a positive number, got {p!r}")
    if method == "newton" and (not float(p).is_integer()):
        raise ValueError(f"p: method='newton' needs an integer p, got {p!r}")
    if isinstance(ridge_epsilon, bool) or not isinstance(ridge_epsilon, numbers.Real) \
            or not math.isfinite(ridge_epsilon) or ridge_epsilon < 0:
        raise ValueError(f"ridge_epsilon: expected a finite number >= 0, got {ridge_epsilon!r}")
    if method not in _METHODS:
        raise ValueError(f"method: must be one of {list(_METHODS)}, got {method!r}")
    if compute_dtype not in _COMPUTE:
        raise ValueError(f"compute_dtype: must be one of {list(_COMPUTE)}, got {compute_dtype!r}")


# ---------------------------------------------------------------- host eigh (NumPy, releases the GIL)


def _eigh_root_host(a: np.ndarray, p: float, eps: float, relative: bool, lapack: str = "numpy"):
    """Root of a host array ``(..., n, n)`` with ``lapack``'s ``eigh``; returns ``(root, ok)`` with
    ``ok`` per matrix."""
    a = host_lapack.symmetrized(a, lapack)
    batch = a.shape[:-2]
    ok = host_lapack.finite_matrices(a)
    if not ok.all():
        a = np.where(ok[..., None, None], a, np.eye(a.shape[-1], dtype=a.dtype))
    try:
        w, q = host_lapack.eigh(a, lapack)
    except np.linalg.LinAlgError:
        # retry matrix by matrix so one bad matrix does not fail the batch
        flat = a.reshape((-1,) + a.shape[-2:])
        ws, qs, oks = [], [], ok.reshape(-1).copy()
        for i, m in enumerate(flat):
            try:
                wi, qi = host_lapack.eigh(m, lapack)
            except np.linalg.LinAlgError:
                wi, qi = np.ones(m.shape[-1], m.dtype), np.eye(m.shape[-1], dtype=m.dtype)
                oks[i] = False
            ws.append(wi)
            qs.append(qi)
        w = np.stack(ws).reshape(batch + (a.shape[-1],))
        q = np.stack(qs).reshape(a.shape)
        ok = oks.reshape(batch)
    root = root_from_eigenpairs(w, q, p, eps, relative, lapack)
    ok = ok & host_lapack.finite_matrices(root)
    return root, ok


def root_from_eigenpairs(w: np.ndarray, q: np.ndarray, p: float, eps: float, relative: bool,
                         lapack: str = "numpy") -> np.ndarray:
    """``Q diag((λ + ridge)^{-1/p}) Qᵀ`` from eigenpairs (host; ``λ`` in any order, negatives clipped to 0)."""
    w = np.maximum(w, 0)
    lmax = w.max(axis=-1, keepdims=True)
    if relative:
        zero = lmax <= 0
        ridge = eps * lmax
        w_r = np.where(zero, 1, w + ridge)
    else:
        w_r = w + eps
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        half = w_r ** (-0.5 / p)  # Q diag(λ^(-1/p)) Qᵀ = B Bᵀ with B = Q diag(λ^(-1/(2p)))
    return host_lapack.scaled_gram(q, half, lapack)


def host_inverse_pth_roots(mats, exponents, *, ridge_epsilon, relative=True, method="eigh",
                           compute_dtype="float64", error_tolerance=1e-6, max_iterations=100,
                           failure_threshold=0.1, ridge_retries=0, lapack="numpy"):
    """Roots of a list of host (NumPy) matrices of any sizes, each with its own exponent.

    Returns ``(roots, ok, fallbacks)``: ``roots[i]`` in ``compute_dtype`` (``None``
    where the root failed: the caller keeps its previous root), ``ok[i]`` a bool
    and ``fallbacks`` the number of Newton roots that fell back to eigh (after the
    ridge escalation ``ε·10^i``, ``i = 1..ridge_retries``). Never
    raises for numerical failures. This is the job the optimizer runs on the
    host, synchronously or on an executor; LAPACK calls release the GIL. ``lapack``: whose
    ``eigh`` and products (:mod:`arrayopt.linalg.host_lapack`).
    """
    dt = np.dtype(compute_dtype)
    roots, oks, fallbacks = [None] * len(mats), [False] * len(mats), 0
    groups: dict = {}
    for i, (m, p) in enumerate(zip(mats, exponents)):  # equal shapes and exponents: one batched call
        groups.setdefault((tuple(m.shape), p), []).append(i)
    for (shape, p), idx in groups.items():
        a = np.empty((len(idx),) + shape, dt)  # one casting copy per matrix into the stack
        for k, i in enumerate(idx):
            a[k] = mats[i]
        if method == "newton":
            r, _, ok, _ = _newton_escalated(np, a, int(p), ridge_epsilon, relative, error_tolerance,
                                            max_iterations, failure_threshold, ridge_retries)
            ok = np.asarray(ok, dtype=bool)
            if not ok.all():
                bad = np.flatnonzero(~ok)
                fallbacks += int(bad.size)
                r_e, ok_e = _eigh_root_host(a[bad], p, ridge_epsilon, relative, lapack)
                r = np.array(r, copy=True)
                r[bad] = r_e
                ok = ok.copy()
                ok[bad] = ok_e
        else:
            r, ok = _eigh_root_host(a, p, ridge_epsilon, relative, lapack)
        for k, i in enumerate(idx):
            good = bool(ok[k])
            roots[i] = r[k] if good else None
            oks[i] = good
    return roots, oks, fallbacks


# ---------------------------------------------------------------- power iteration and Newton (any namespace)


def power_iteration(A, *, num_iters: int = 100, tol: float = 1e-6):
    """Largest eigenvalue of symmetric PSD ``A`` (``(..., n, n)``) by power iteration.

    The start vector is fixed (uniform in [-1, 1], seed 1729), so results are
    deterministic; the loop stops when the Rayleigh quotient changes by at most
    ``tol`` relative. Returns an array of shape ``A.shape[:-2]``.
    """
    xp = namespace_of(A)
    n = A.shape[-1]
    v0 = np.random.RandomState(1729).uniform(-1.0, 1.0, n)
    v = xp.asarray(v0, dtype=A.dtype, device=device_of(A))
    v = xp.broadcast_to(v, A.shape[:-1])
    s_prev = None
    s = xp.zeros(A.shape[:-2], dtype=A.dtype, device=device_of(A))
    done = xp.zeros(A.shape[:-2], dtype=xp.bool, device=device_of(A))
    for _ in range(num_iters):
        # a converged matrix keeps its vector and quotient, so a batch gives each matrix's own result
        v = v / xp.maximum(xp.linalg.vector_norm(v, axis=-1, keepdims=True), 1e-30)
        w = xp.matmul(A, v[..., None])[..., 0]
        s_new = xp.sum(v * w, axis=-1)
        s = xp.where(done, s, s_new)
        if s_prev is not None:
            done = done | (xp.abs(s_new - s_prev) <= tol * xp.abs(s_new))
            if bool(xp.all(done)):
                break
        s_prev = xp.where(done, s_prev, s_new) if s_prev is not None else s_new
        v = xp.where(done[..., None], v, w)
    return s


def _matpow(xp, T, p: int):
    """``T^p`` for integer ``p >= 1`` by binary exponentiation."""
    result = None
    base = T
    while p:
        if p & 1:
            result = base if result is None else xp.matmul(result, base)
        p >>= 1
        if p:
            base = xp.matmul(base, base)
    return result


def _newton(xp, A, p: int, eps, relative, tol, max_iters, threshold):
    """Coupled Newton in namespace ``xp``; returns ``(H, error, ok)`` per matrix."""
    n = A.shape[-1]
    dev = device_of(A)
    eye = xp.eye(n, dtype=A.dtype, device=dev)
    A = 0.5 * (A + xp.matrix_transpose(A))
    finite_in = xp.all(xp.isfinite(A), axis=(-2, -1))
    A = xp.where(finite_in[..., None, None], A, eye)
    if relative:
        lmax = power_iteration(A)
        zero = lmax <= 0
        ridge = eps * xp.where(zero, xp.ones_like(lmax), lmax)
    else:
        zero = xp.zeros(A.shape[:-2], dtype=xp.bool, device=dev)
        ridge = xp.full(A.shape[:-2], eps, dtype=A.dtype, device=dev)
    Ab = A + ridge[..., None, None] * eye
    Ab = xp.where(zero[..., None, None], eye, Ab)
    fro = xp.linalg.matrix_norm(Ab, ord="fro")
    z = (1.0 + p) / (2.0 * fro)
    M = z[..., None, None] * Ab
    H = (z ** (1.0 / p))[..., None, None] * eye
    err = xp.max(xp.abs(M - eye), axis=(-2, -1))
    done = err <= tol
    for _ in range(max_iters):
        if bool(xp.all(done)):
            break
        T = ((p + 1.0) * eye - M) / p
        M_new = xp.matmul(_matpow(xp, T, p), M)
        H_new = xp.matmul(H, T)
        err_new = xp.max(xp.abs(M_new - eye), axis=(-2, -1))
        diverged = ~(err_new < 1.2 * err)  # NaN counts as diverged
        stop = done | diverged
        M = xp.where(stop[..., None, None], M, M_new)
        H = xp.where(stop[..., None, None], H, H_new)
        err = xp.where(stop, err, err_new)
        done = stop | (err_new <= tol)
    ok = finite_in & (err <= threshold) & xp.all(xp.isfinite(H), axis=(-2, -1))
    H = 0.5 * (H + xp.matrix_transpose(H))
    return H, err, ok


def _newton_escalated(xp, A, p: int, eps, relative, tol, max_iters, threshold, retries: int):
    """Coupled Newton at ``ε``, then at ``ε·10^i`` (``i = 1..retries``) for the matrices still failing.

    Returns ``(H, error, ok, used)`` per matrix, ``used`` the ``i`` each root converged at.
    """
    H, err, ok = _newton(xp, A, p, eps, relative, tol, max_iters, threshold)
    used = xp.zeros(ok.shape, dtype=xp.int64, device=device_of(A))
    for i in range(1, retries + 1):
        if bool(xp.all(ok)):
            break
        H_i, err_i, ok_i = _newton(xp, A, p, eps * 10.0 ** i, relative, tol, max_iters, threshold)
        take = ok_i & ~ok
        H = xp.where(take[..., None, None], H_i, H)
        err = xp.where(take, err_i, err)
        used = xp.where(take, xp.full_like(used, i), used)
        ok = ok | take
    return H, err, ok, used


def eigh_inverse_pth_root(xp, A, p: float, eps: float, relative: bool):
    r"""``(A + ridge·I)^{-1/p}`` of symmetric PSD ``A`` (``(..., n, n)``) by ``xp.linalg.eigh`` in ``A``'s
    namespace and dtype: the arithmetic of the host ``eigh`` method (symmetrize, clip ``λ < 0`` to 0,
    relative or absolute ridge, the identity for a zero ``A`` with a relative ridge, ``B Bᵀ`` with
    ``B = Q diag((λ + ridge)^{-1/(2p)})``) as pure array-API code without value-dependent branches,
    so it traces (e.g. into a jitted JAX step). Returns ``(root, ok)``: ``ok`` (shape ``(...)``)
    false where the root is not finite.
    """
    a = 0.5 * (A + xp.matrix_transpose(A))
    w, q = xp.linalg.eigh(a)
    w = xp.maximum(w, xp.zeros_like(w))
    lmax = xp.max(w, axis=-1, keepdims=True)
    if relative:
        w_r = xp.where(lmax <= 0, xp.ones_like(w), w + eps * lmax)
    else:
        w_r = w + eps
    b = q * (w_r ** (-0.5 / p))[..., None, :]
    root = xp.matmul(b, xp.matrix_transpose(b))
    return root, xp.all(xp.isfinite(root), axis=(-2, -1))

# ---------------------------------------------------------------- public API


def _compute_dtype_in(xp, A, compute_dtype: str):
    """``compute_dtype`` in ``xp`` where the namespace/device has it, else float32."""
    if compute_dtype == "float64" and library_of(A) == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            return xp.float32
    if compute_dtype == "float64" and library_of(A) == "torch" and A.device.type == "mps":
        return xp.float32
    return getattr(xp, compute_dtype)


def _to_host(A, dtype: str) -> np.ndarray:
    return to_numpy(A).astype(dtype, copy=False)


def _from_host(h: np.ndarray, like):
    lib = library_of(like)
    xp = namespace_of(like)
    if lib == "numpy":
        return np.asarray(h, dtype=like.dtype)
    if lib == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(h)).to(device=like.device, dtype=like.dtype)
    name = dtype_name(like.dtype)
    host = h.astype(name) if name in ("float32", "float64", "float16") else h.astype(np.float32)
    out = xp.asarray(host, device=device_of(like))
    return out if out.dtype == like.dtype else xp.astype(out, like.dtype)


def inverse_pth_root_info(A, p, *, ridge_epsilon: float = 1e-6, method: str = "eigh",
                          relative: bool = True, compute_dtype: str = "float64",
                          error_tolerance: float = 1e-6, max_iterations: int = 100,
                          failure_threshold: float = 0.1, ridge_retries: int = 0):
    """Like :func:`inverse_pth_root` but returns ``(root, info)`` and never raises on failure.

    ``info``: ``method`` (per matrix: what produced the root), ``ok`` (bool per
    matrix; a failed matrix's root is the identity), ``fallbacks`` (Newton roots
    that fell back to eigh), ``error`` (Newton's final ``max|M - I|``, 0 for eigh)
    and ``retries`` (per matrix, the ``i`` of the ridge ``ε·10^i`` Newton converged at).
    """
    _check_args(p, ridge_epsilon, method, compute_dtype)
    if isinstance(ridge_retries, bool) or not isinstance(ridge_retries, numbers.Integral) or ridge_retries < 0:
        raise ValueError(f"ridge_retries: expected an integer >= 0, got {ridge_retries!r}")
    if len(A.shape) < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A: expected square matrices (..., n, n), got shape {tuple(A.shape)}")
    name = dtype_name(A.dtype)
    if name not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"A: expected a real floating dtype, got {name}")
    batch = tuple(A.shape[:-2])
    if method == "newton":
        xp = namespace_of(A)
        ns = Namespace(xp, device_of(A), library_of(A))
        work = xp.astype(A, _compute_dtype_in(xp, A, compute_dtype))
        H, err, ok, used = _newton_escalated(ns.xp, work, int(p), float(ridge_epsilon), relative,
                                             error_tolerance, max_iterations, failure_threshold, ridge_retries)
        ok_h = np.asarray(to_numpy(ok), dtype=bool).reshape(batch)
        err_h = np.asarray(to_numpy(err), dtype=np.float64).reshape(batch)
        retries = np.asarray(to_numpy(used), dtype=np.int64).reshape(batch)
        methods = np.full(batch, "newton", dtype=object)
        fallbacks = int((~ok_h).sum())
        if fallbacks:
            hostA = _to_host(A, compute_dtype)
            r_e, ok_e = _eigh_root_host(hostA, p, float(ridge_epsilon), relative,
                                        host_lapack.lapack_for(library_of(A)))
            H_h = to_numpy(H).astype(compute_dtype).reshape(hostA.shape)
            H_h = np.where(ok_h[..., None, None], H_h, r_e)
            methods = np.where(ok_h, methods, "eigh")
            ok_h = ok_h | ok_e
            eye = np.eye(A.shape[-1], dtype=H_h.dtype)
            H_h = np.where(ok_h[..., None, None], H_h, eye)
            root = _from_host(H_h, A)
        else:
            root = xp.astype(H, A.dtype)
        info = {"method": methods, "ok": ok_h, "fallbacks": fallbacks, "error": err_h, "retries": retries}
        return root, info
    hostA = _to_host(A, compute_dtype)
    r, ok = _eigh_root_host(hostA, p, float(ridge_epsilon), relative, host_lapack.lapack_for(library_of(A)))
    r = np.where(ok[..., None, None], r, np.eye(A.shape[-1], dtype=r.dtype))
    info = {"method": np.full(batch, "eigh", dtype=object), "ok": ok, "fallbacks": 0,
            "error": np.zeros(batch), "retries": np.zeros(batch, dtype=np.int64)}
    return _from_host(r, A), info


def inverse_pth_root(A: Any, p, *, ridge_epsilon: float = 1e-6, method: str = "eigh",
                     relative: bool = True, compute_dtype: str = "float64",
                     error_tolerance: float = 1e-6, max_iterations: int = 100,
                     failure_threshold: float = 0.1, ridge_retries: int = 0):
    r"""``(A + ε·λmax·I)^{-1/p}`` for symmetric PSD ``A`` (batched over leading dims).

    Args:
      A: ``(..., n, n)`` symmetric positive semi-definite, any array-API namespace.
      p: the root (``-1/p`` is the exponent); an integer for ``method="newton"``.
      ridge_epsilon: ``ε``; relative to ``λmax`` unless ``relative=False``.
      method: ``"eigh"`` (host LAPACK, ``compute_dtype``) or ``"newton"`` (coupled
        Newton in ``A``'s namespace, falling back to eigh when its error check fails).
      compute_dtype: ``"float64"`` (default) or ``"float32"``.
      ridge_retries: ``method="newton"`` only: a matrix whose iteration fails at ``ε``
        is retried at ``ε·10^i`` for ``i = 1..ridge_retries`` (JAX's ridge escalation)
        before it falls back to eigh at ``ε``.

    Raises ``ArithmeticError`` if a root cannot be computed (non-finite input or
    both methods failed); :func:`inverse_pth_root_info` reports it instead.
    """
    root, info = inverse_pth_root_info(
        A, p, ridge_epsilon=ridge_epsilon, method=method, relative=relative,
        compute_dtype=compute_dtype, error_tolerance=error_tolerance,
        max_iterations=max_iterations, failure_threshold=failure_threshold, ridge_retries=ridge_retries)
    if not np.all(info["ok"]):
        bad = np.argwhere(~np.asarray(info["ok"]).reshape(-1))[:, 0].tolist()
        raise ArithmeticError(f"A: inverse {p}-th root failed for matrices {bad[:8]} "
                              f"(non-finite input or no accurate root)")
    return root
