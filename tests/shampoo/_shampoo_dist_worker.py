"""Worker for tests/test_shampoo_distributed.py: runs Shampoo on one rank and saves params + state."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import arrayopt as ao  # noqa: E402
from arrayopt.shampoo import MPIComm, TorchDistributedComm  # noqa: E402


def run(comm, out):
    rng = np.random.default_rng(0)
    shapes = {"w": (9, 7), "v": (5, 3, 4), "b": (6,)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    opt = ao.shampoo(learning_rate=0.05, block_size=4, precondition_every=2, comm=comm)
    state = opt.init(params)
    for _ in range(5):
        g = {k: rng.standard_normal(s) for k, s in shapes.items()}  # same on every rank (same seed)
        params, state = opt.step(params, g, state)
    np.savez(out, **{f"p_{k}": v for k, v in params.items()},
             **{f"r_{i}": r for i, r in enumerate(f for leaf in state["roots"] for blk in leaf for f in blk)})


if __name__ == "__main__":
    kind, out = sys.argv[1], sys.argv[2]
    if kind == "mpi":
        comm = MPIComm()
        run(comm, f"{out}.{comm.rank}.npz")
    elif kind == "torch":
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        comm = TorchDistributedComm()
        run(comm, f"{out}.{comm.rank}.npz")
        dist.barrier()
        dist.destroy_process_group()
        # torch's gloo teardown at interpreter exit aborts now and then ("terminate called without an
        # active exception"): the result is saved and the group destroyed, so skip the C++ destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    else:
        run(None, f"{out}.single.npz")
