"""Spreading root work across data-parallel workers: one small communicator interface.

A communicator has ``rank``, ``size`` and ``allgather(obj) -> list`` (one entry
per rank, rank order). Adapters:

- :class:`TorchDistributedComm` over ``torch.distributed`` (gloo on CPU, NCCL on GPU;
  the process group must be initialised by the caller),
- :class:`MPIComm` over ``mpi4py`` (any ``MPI.Comm``, default ``COMM_WORLD``),
- :class:`LocalComm`: one process (the default).

Both framework adapters import their library lazily. Every rank must call the
optimizer with the same gradients (data-parallel training after the gradient
all-reduce); factors are assigned to ranks by :func:`assign_lpt` (greedy
longest-processing-time on cost ``d³``, deterministic), each rank computes the
roots of its share and the results are all-gathered, so every rank installs
the same roots as a single process would.
"""

from __future__ import annotations

import heapq
from typing import Any, Protocol

__all__ = ["Communicator", "LocalComm", "TorchDistributedComm", "MPIComm", "assign_lpt", "as_comm"]


class Communicator(Protocol):
    rank: int
    size: int

    def allgather(self, obj: Any) -> list: ...


class LocalComm:
    """A single process: rank 0 of 1."""

    rank = 0
    size = 1

    def allgather(self, obj):
        return [obj]


class TorchDistributedComm:
    """``torch.distributed`` (``all_gather_object``) on ``group`` (default: the world group)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("comm: torch.distributed is not initialised (call init_process_group first)")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def allgather(self, obj):
        out = [None] * self.size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out


class MPIComm:
    """``mpi4py`` (``comm.allgather``) on ``comm`` (default ``MPI.COMM_WORLD``)."""

    def __init__(self, comm=None):
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allgather(self, obj):
        return self.comm.allgather(obj)


def as_comm(comm) -> Any:
    """``None`` → :class:`LocalComm`; an object with rank/size/allgather is used as is."""
    if comm is None:
        return LocalComm()
    for attr in ("rank", "size", "allgather"):
        if not hasattr(comm, attr):
            raise TypeError(f"comm: expected a communicator with rank, size and allgather(); "
                            f"{type(comm).__name__} has no {attr!r}")
    return comm


def assign_lpt(costs, size: int) -> list:
    """Owner rank of each item: greedy LPT (largest cost first to the least-loaded rank).

    Ties break by item index and rank number, so every rank computes the same
    assignment. Max load is within 4/3 of the optimum (Graham).
    """
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0, r) for r in range(size)]
    owner = [0] * len(costs)
    for i in order:
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owner
