"""ZeroRedundancyOptimizer over the torch adapter: 2 gloo ranks on loopback give the 1-process params
and hold about half the optimizer state each."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="the torch adapter needs torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_torch_zero_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NAMES = ["adam", "sonew", "shampoo"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank run and one single-process run over every optimizer: ``out`` path prefix."""
    out = str(tmp_path_factory.mktemp("zero") / "run")
    names = ",".join(NAMES)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, names, "zero", out], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    subprocess.run([sys.executable, WORKER, names, "single", out], env=env, check=True, timeout=240)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_zero_redundancy_optimizer_shards_the_state_and_matches_one_process(name, runs):
    out = f"{runs}.{name}"
    single = torch.load(f"{out}.single.pt", weights_only=True)
    ranks = [torch.load(f"{out}.{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        for a, b in zip(r["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    total = single["bytes"]
    assert sum(r["bytes"] for r in ranks) == total
    assert all(0.3 * total < r["bytes"] < 0.7 * total for r in ranks), [r["bytes"] for r in ranks]
