"""The host LAPACK and BLAS that root jobs call: NumPy's, or torch's when the leaves are torch tensors.

Shampoo's roots and eigenbases are computed on host (NumPy) copies of the statistics.
When the leaves are torch tensors the job calls torch's ``eigh`` and ``matmul`` on
zero-copy views of those host arrays (``torch.from_numpy``), for two reasons:

- one thread pool serves the whole step. NumPy's OpenBLAS threads and torch's OpenMP
  threads both spin for a while after each call; alternating between them on the same
  cores made every call of the other pool slower (numpy ``eigh`` inside a torch step
  took 3.0 s where it took 1.9 s alone, ResNet-18 tree, 2 cores);
- torch's LAPACK is faster here: ``eigh`` of ten 512² matrices took 151 ms (float64) and
  91 ms (float32) against NumPy's 222 and 217 ms.

Both return NumPy arrays and raise ``numpy.linalg.LinAlgError`` when a decomposition
does not converge. Their results agree to the rounding level of the decomposition,
not bit for bit; a run on one array library is deterministic.
"""

from __future__ import annotations

import numpy as np

__all__ = ["lapack_for", "eigh", "symmetrized", "scaled_gram", "finite_matrices"]


def lapack_for(library: str) -> str:
    """The host LAPACK for leaves of ``library`` (``"torch"`` for torch tensors on any device)."""
    return "torch" if library == "torch" else "numpy"


def _torch_view(a: np.ndarray):
    """A torch tensor sharing ``a``'s memory (any layout torch takes: no copy unless a stride is negative)."""
    import torch

    if any(st < 0 for st in a.strides):
        a = np.ascontiguousarray(a)
    return torch.from_numpy(a)


def eigh(a: np.ndarray, lapack: str = "numpy"):
    """``(w, q)`` of the symmetric ``a`` (``(..., n, n)``, lower triangle read), ``w`` ascending."""
    if lapack == "numpy":
        return np.linalg.eigh(a)
    import torch

    try:
        w, q = torch.linalg.eigh(_torch_view(a))
    except RuntimeError as e:  # torch.linalg.LinAlgError: no convergence
        raise np.linalg.LinAlgError(str(e)) from e
    return w.numpy(), q.numpy()


def symmetrized(a: np.ndarray, lapack: str = "numpy") -> np.ndarray:
    """``(A + Aᵀ)/2`` of each matrix of ``a`` (a new array)."""
    if lapack == "numpy":
        s = a + np.swapaxes(a, -1, -2)
        s *= 0.5
        return s
    t = _torch_view(a)  # multi-threaded: a transposed read of a large stack is slow in one thread
    return (t + t.mT).mul_(0.5).numpy()


def scaled_gram(q: np.ndarray, h: np.ndarray, lapack: str = "numpy") -> np.ndarray:
    """``B Bᵀ`` with ``B = Q diag(h)`` for each matrix of ``q`` (``(..., n, k)``, ``h`` ``(..., k)``).

    NumPy: one symmetric rank-k update per matrix (half a GEMM's flops, exactly symmetric).
    torch: one batched GEMM (symmetric to rounding: a symmetrizing pass over a GPT-2-sized set of
    roots costs seconds).
    """
    if lapack == "numpy":
        b = q * h[..., None, :]
        flat = b.reshape((-1,) + b.shape[-2:])
        return np.stack([m @ m.T for m in flat]).reshape(b.shape[:-1] + b.shape[-2:-1])
    import torch

    b = _torch_view(q) * _torch_view(h)[..., None, :]
    return torch.matmul(b, b.mT).numpy()


def finite_matrices(a: np.ndarray) -> np.ndarray:
    """Per matrix of ``a`` (``(..., n, n)``), whether every entry is finite: a finite sum proves it
    (NaN and ±Inf propagate through addition); only the matrices whose sum is not finite are read
    again entry by entry."""
    with np.errstate(all="ignore"):
        ok = np.isfinite(np.sum(a, axis=(-1, -2)))
    if not ok.all():
        ok = np.isfinite(a).all(axis=(-1, -2))
    return ok
