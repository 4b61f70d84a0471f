"""Root jobs: computed inline, or asynchronously on any ``concurrent.futures.Executor``.

A root job takes host copies of the statistics (NumPy), computes every inverse
root with :func:`arrayopt.linalg.roots.host_inverse_pth_roots` (NumPy/LAPACK,
which releases the GIL, so a thread pool really runs roots beside the training
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

from ..linalg.roots import host_inverse_pth_roots
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
                 compute_dtype, threshold, out_dtype, ridge_retries=0):
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


def run_root_job(job: RootJob, comm) -> dict:
    """Compute this rank's roots, all-gather, return ``{"roots": [...], "failures", "fallbacks"}``.

    ``roots`` is a flat list over all factors (global order) of host arrays in
    ``job.out_dtype``, or ``None`` where the root failed.
    """
    roots, ok, fallbacks = host_inverse_pth_roots(
        job.mats, job.exponents, ridge_epsilon=job.eps, relative=job.relative, method=job.method,
        compute_dtype=job.compute_dtype, failure_threshold=job.threshold, ridge_retries=job.ridge_retries)
    mine = {i: (None if r is None else np.ascontiguousarray(r.astype(job.out_dtype)))
            for i, r in zip(job.index, roots)}
    local = {"roots": mine, "failures": int(sum(1 for g in ok if not g)), "fallbacks": int(fallbacks)}
    parts = comm.allgather(local) if comm.size > 1 else [local]
    flat = [None] * job.total
    failures = fallbacks = 0
    for part in parts:
        for i, r in part["roots"].items():
            flat[i] = r
        failures += part["failures"]
        fallbacks += part["fallbacks"]
    return {"roots": flat, "failures": failures, "fallbacks": fallbacks}


def factor_costs(shapes) -> list:
    """Cost model of a root: ``d³`` flops for a ``d×d`` factor."""
    return [int(s[0]) ** 3 for s in shapes]


def owners(shapes, size: int) -> list:
    return assign_lpt(factor_costs(shapes), size) if size > 1 else [0] * len(shapes)
