"""Root jobs: computed inline, or asynchronously on any ``concurrent.futures.Executor``.

A root job takes host copies of the statistics (NumPy), computes every inverse
root with :func:`arrayopt.linalg.roots.host_inverse_pth_roots` (host LAPACK:
NumPy's, or torch's for torch leaves; it releases the GIL, so a thread pool really runs roots beside the training
step), spreads the factors over the ranks of a communicator and all-gathers
the results. Numerical failures never raise: a failed factor's root is
``None`` (the optimizer keeps the previous one) and is counted.

Timing is deterministic: the roots of the statistics of step ``s`` are
installed at the start of step ``s + delay``, waiting for the job there if it
is not finished. So an asynchronous run equals a synchronous run with the same
``root_delay`` bit for bit, and ``save_state`` (which settles pending jobs into
the state) gives the same continuation as an uninterrupted run.
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np

from .eigenbasis import refresh_eigenbasis
from ..linalg.roots import host_inverse_pth_roots, root_from_eigenpairs
from .distributed import assign_lpt

__all__ = ["InlineExecutor", "RootJob", "run_root_job"]


class InlineExecutor:
    """An executor that runs each job at ``submit`` (for tests and for ``root_delay`` without threads)."""

    def submit(self, fn, *args, **kwargs):
        f = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            f.set_exception(e)
        return f

    def shutdown(self, wait=True, **kwargs):
        pass


class RootJob:
    """Everything a root computation needs, as plain host data (picklable)."""

    def __init__(self, mats, exponents, index, total, owner, rank, *, eps, relative, method,
                 compute_dtype, threshold, out_dtype, ridge_retries=0, preconditioner="root_inverse",
                 prev=None, qr_iterations=1, qr_tolerance=0.01, lapack="numpy"):
        self.mats = mats            # host copies of the factors this rank owns
        self.exponents = exponents  # their exponents
        self.index = index          # their global factor indices
        self.total = total
        self.owner = owner
        self.rank = rank
        self.eps = eps
        self.relative = relative
        self.method = method
        self.compute_dtype = compute_dtype
        self.threshold = threshold
        self.out_dtype = out_dtype
        self.ridge_retries = ridge_retries
        self.preconditioner = preconditioner  # "root_inverse" or "eigenvalue_corrected"
        self.prev = prev                    # previous bases of the owned factors (None: first refresh)
        self.qr_iterations = qr_iterations
        self.qr_tolerance = qr_tolerance
        self.lapack = lapack                # whose host eigh and products (arrayopt.linalg.host_lapack)

    @property
    def uses_bases(self) -> bool:
        return self.preconditioner == "eigenvalue_corrected" or self.method == "qr"


def _out(job, r):
    return None if r is None else np.ascontiguousarray(r.astype(job.out_dtype))


def _local_roots(job: RootJob) -> dict:
    roots, ok, fallbacks = host_inverse_pth_roots(
        job.mats, job.exponents, ridge_epsilon=job.eps, relative=job.relative, method=job.method,
        compute_dtype=job.compute_dtype, failure_threshold=job.threshold, ridge_retries=job.ridge_retries,
        lapack=job.lapack)
    return {"roots": {i: _out(job, r) for i, r in zip(job.index, roots)},
            "failures": int(sum(1 for g in ok if not g)), "fallbacks": int(fallbacks), "skips": 0}


def _local_bases(job: RootJob) -> dict:
    """Eigenbases (eigh, or QR warm-started from ``job.prev``) and, for root-inverse, roots from them.

    The bases always come from NumPy's LAPACK: within a repeated eigenvalue (a rank-deficient
    early factor has a whole null space) each LAPACK picks its own basis, and the eigenvalue-
    corrected step and the QR warm starts depend on that choice (torch's ``eigh`` moved params by
    0.19 after 3 steps on a 5-entry leaf). A root ``Q f(Λ) Qᵀ`` does not, so roots use ``job.lapack``."""
    method = "eigh" if job.method == "eigh" else "qr"
    bases, perms, roots = {}, {}, {}
    failures = skips = 0
    prev = job.prev if job.prev is not None else [None] * len(job.mats)
    for i, m, q0, p in zip(job.index, job.mats, prev, job.exponents):
        r = refresh_eigenbasis(m, q0, method=method, iterations=job.qr_iterations, tolerance=job.qr_tolerance,
                               compute_dtype=job.compute_dtype, eigenvalues=job.preconditioner == "root_inverse")
        failures += r.status == "failed"
        skips += r.status == "skipped"
        bases[i] = _out(job, r.basis)
        perms[i] = r.perm
        if job.preconditioner == "root_inverse":
            root = None if r.basis is None else root_from_eigenpairs(r.eigenvalues, r.basis, p, job.eps, job.relative, job.lapack)
            if root is not None and not np.isfinite(root).all():
                root, bases[i], perms[i] = None, None, None
                failures += 1
            roots[i] = _out(job, root)
    out = {"bases": bases, "perms": perms, "failures": int(failures), "fallbacks": 0, "skips": int(skips)}
    if job.preconditioner == "root_inverse":
        out["roots"] = roots
    return out


def run_root_job(job: RootJob, comm) -> dict:
    """Compute this rank's part, all-gather, return flat lists over all factors (global order).

    ``{"roots": [...], "failures", "fallbacks", "skips"}``, plus ``"bases"`` and
    ``"perms"`` when the job refreshes eigenbases (eigenvalue correction, or
    ``method="qr"``; then ``"roots"`` only for root-inverse). Arrays are host
    arrays in ``job.out_dtype``; ``None`` where the computation failed (the
    caller keeps the previous root or basis).
    """
    local = _local_bases(job) if job.uses_bases else _local_roots(job)
    parts = comm.allgather(local) if comm.size > 1 else [local]
    keys = [k for k in ("roots", "bases", "perms") if k in local]
    flat = {k: [None] * job.total for k in keys}
    counts = {"failures": 0, "fallbacks": 0, "skips": 0}
    for part in parts:
        for k in keys:
            for i, r in part[k].items():
                flat[k][i] = r
        for k in counts:
            counts[k] += part[k]
    return {**flat, **counts}


def factor_costs(shapes) -> list:
    """Cost model of a root: ``d³`` flops for a ``d×d`` factor."""
    return [int(s[0]) ** 3 for s in shapes]


def owners(shapes, size: int) -> list:
    return assign_lpt(factor_costs(shapes), size) if size > 1 else [0] * len(shapes)


def job_result(future, stats_step):
    """The result of a root job's future; a failed job raises ``RuntimeError`` naming its step."""
    try:
        return future.result()
    except Exception as e:
        raise RuntimeError(
            f"shampoo: the asynchronous root job for the statistics of step {stats_step} failed "
            f"with {type(e).__name__}: {e}; the state is unchanged (this call was rejected)") from e
