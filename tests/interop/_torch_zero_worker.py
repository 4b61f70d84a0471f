"""Worker for test_torch_zero.py: trains a small model with the torch adapter under
ZeroRedundancyOptimizer (2 gloo ranks) or alone, and saves the params and its state bytes."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

import arrayopt as ao  # noqa: E402
from arrayopt.interop.torch import Optimizer  # noqa: E402

MAKERS = {"adam": lambda: ao.adam(0.01), "sonew": lambda: ao.sonew(0.01, band=1),
          "shampoo": lambda: ao.shampoo(0.01, block_size=8, precondition_every=2)}


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).double()


def _bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_bytes(u) for u in v)
    return 0


def state_bytes(opt) -> int:
    return sum(_bytes(v) for entries in opt.state.values() for k, v in entries.items() if k != "step")


def run(names, distributed, out):
    for name in names.split(","):
        run_one(name, distributed, f"{out}.{name}")


def run_one(name, distributed, out):
    m = model()
    if distributed:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=Optimizer, opt=MAKERS[name]())
        local = opt.optim
    else:
        opt = local = Optimizer(m.parameters(), MAKERS[name]())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 12, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()  # same data on every rank: the averaged gradient
        opt.step()
    rank = torch.distributed.get_rank() if distributed else "single"
    torch.save({"params": [p.detach().clone() for p in m.parameters()], "bytes": state_bytes(local)},
               f"{out}.{rank}.pt")


if __name__ == "__main__":
    name, kind, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if kind == "zero":
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        run(name, True, out)
        dist.barrier()
        dist.destroy_process_group()
        # torch's gloo teardown at interpreter exit aborts now and then ("terminate called without an
        # active exception", no Python frame on the stack): every result is saved and the group is
        # destroyed, so leave without running the C++ static destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    else:
        run(name, False, out)
