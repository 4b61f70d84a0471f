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

__all__ = ["LAPACKS", "lapack_for", "eigh", "gram"]

#: the host libraries a root job can call
LAPACKS = ("numpy", "torch")


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


def gram(b: np.ndarray, lapack: str = "numpy") -> np.ndarray:
    """``B Bᵀ`` of each matrix of ``b`` (``(..., n, k)``), exactly symmetric.

    NumPy: one symmetric rank-k update per matrix (half a GEMM's flops). torch: one batched
    GEMM, then ``(C + Cᵀ)/2`` (exactly symmetric, since floating-point addition commutes).
    """
    if lapack == "numpy":
        flat = b.reshape((-1,) + b.shape[-2:])
        return np.stack([m @ m.T for m in flat]).reshape(b.shape[:-1] + b.shape[-2:-1])
    import torch

    t = _torch_view(b)
    c = torch.matmul(t, t.mT)
    return ((c + c.mT) * 0.5).numpy()
