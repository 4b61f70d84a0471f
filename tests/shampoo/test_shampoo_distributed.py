"""Roots spread over 2 processes on loopback (torch.distributed gloo, mpi4py) equal the single-process run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from arrayopt.shampoo.distributed import assign_lpt

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_shampoo_dist_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compare(prefix, ranks):
    ref = np.load(f"{prefix}.single.npz")
    for r in ranks:
        got = np.load(f"{prefix}.{r}.npz")
        assert sorted(got.files) == sorted(ref.files)
        for k in ref.files:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"rank {r} {k}")


def _single(prefix):
    subprocess.run([sys.executable, WORKER, "single", prefix], check=True, timeout=120)


def test_lpt_assignment_balanced_and_deterministic():
    costs = [1000, 1000, 8, 27, 512, 64, 1, 343]
    own = assign_lpt(costs, 2)
    assert own == assign_lpt(costs, 2)
    loads = [sum(c for c, o in zip(costs, own) if o == r) for r in range(2)]
    assert max(loads) <= 4 / 3 * (sum(costs) / 2) + max(costs)
    assert set(own) == {0, 1}


def test_torch_distributed_gloo_two_processes_equal_single(tmp_path):
    pytest.importorskip("torch.distributed", reason="torch.distributed is needed")
    prefix = str(tmp_path / "torch")
    _single(prefix)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    procs = [subprocess.Popen([sys.executable, WORKER, "torch", prefix], env=dict(env, RANK=str(r)))
             for r in range(2)]
    assert all(p.wait(timeout=180) == 0 for p in procs)
    _compare(prefix, [0, 1])


def test_mpi4py_two_processes_equal_single(tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich)")
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("mpiexec not found (pip install mpich provides it)")
    prefix = str(tmp_path / "mpi")
    _single(prefix)
    res = subprocess.run([mpiexec, "-n", "2", sys.executable, WORKER, "mpi", prefix],
                         timeout=180, capture_output=True, text=True)
    if res.returncode != 0 and "mpi" in (res.stderr or "").lower() and "error" in res.stderr.lower() \
            and not os.path.exists(f"{prefix}.0.npz"):
        pytest.skip(f"mpiexec could not start 2 processes here: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-2000:]
    _compare(prefix, [0, 1])
