"""Asynchronous roots: equal to synchronous roots with the same staleness; errors surface; save settles."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import arrayopt as ao
from _arrays import snapshot
from arrayopt.shampoo import InlineExecutor


def _grads(k, seed=0):
    rng = np.random.default_rng(seed)
    return [{"w": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
            for _ in range(k)]


def _run(opt, grads, params=None):
    params = params or {"w": np.ones((6, 5), np.float32), "b": np.zeros(5, np.float32)}
    s = opt.init(params)
    for g in grads:
        params, s = opt.step(params, g, s)
    return params, s


@pytest.mark.parametrize("delay,every", [(1, 1), (1, 3), (2, 3), (4, 2)])
def test_async_equals_sync_with_same_staleness(delay, every):
    grads = _grads(9)
    kw = dict(learning_rate=0.05, block_size=4, precondition_every=every, root_delay=delay)
    p_sync, s_sync = _run(ao.shampoo(**kw), grads)
    with ThreadPoolExecutor(2) as ex:
        p_async, s_async = _run(ao.shampoo(**kw, executor=ex), grads)
        s_async.settle()
    assert snapshot(p_sync) == snapshot(p_async)
    assert snapshot(dict(s_sync)) == snapshot(dict(s_async))
    assert s_async["root_staleness"] >= min(delay, 1)


def test_default_async_delay_is_one_step_and_staleness_recorded():
    grads = _grads(4)
    with ThreadPoolExecutor(1) as ex:
        opt = ao.shampoo(learning_rate=0.05, block_size=8, executor=ex)
        params = {"w": np.ones((6, 5), np.float32), "b": np.zeros(5, np.float32)}
        s = opt.init(params)
        params, s = opt.step(params, grads[0], s)
        assert s["roots_step"] == 0 and s["pending"]["stats_step"] == 1  # step 1 used grafting
        params, s = opt.step(params, grads[1], s)
        assert s["roots_step"] == 1 and s["root_staleness"] == 1
    p_ref, s_ref = _run(ao.shampoo(learning_rate=0.05, block_size=8, root_delay=1), grads[:2])
    assert snapshot(p_ref) == snapshot(params)


def test_root_job_exception_surfaces_at_next_step_and_state_unchanged(monkeypatch):
    from arrayopt.shampoo import async_roots

    grads = _grads(3)
    opt = ao.shampoo(learning_rate=0.05, block_size=8, executor=InlineExecutor())
    params = {"w": np.ones((6, 5), np.float32), "b": np.zeros(5, np.float32)}
    s = opt.init(params)
    params, s = opt.step(params, grads[0], s)

    def boom(*a, **k):
        raise MemoryError("no memory for roots")

    monkeypatch.setattr(async_roots, "host_inverse_pth_roots", boom)
    params, s = opt.step(params, grads[1], s)  # installs step-1 roots, submits a job that fails
    before_s, before_p = snapshot(dict(s)), snapshot(params)
    with pytest.raises(RuntimeError, match=r"asynchronous root job for the statistics of step 2 failed with MemoryError"):
        opt.step(params, grads[2], s)
    assert snapshot(dict(s)) == before_s and snapshot(params) == before_p


def test_save_state_settles_pending_roots_and_continuation_is_identical(tmp_path):
    grads = _grads(6)
    gate = threading.Event()

    with ThreadPoolExecutor(1) as ex:
        opt = ao.shampoo(learning_rate=0.05, block_size=4, precondition_every=2, root_delay=2, executor=ex)
        params = {"w": np.ones((6, 5), np.float32), "b": np.zeros(5, np.float32)}
        s = opt.init(params)
        for g in grads[:3]:
            params, s = opt.step(params, g, s)
        assert s["pending"] is not None
        ao.save_state(s, tmp_path / "s.npz")  # settles
        assert s["pending"]["result"] is not None
        loaded = ao.load_state(tmp_path / "s.npz", like=s)
        assert snapshot(loaded) == snapshot(dict(s))
        p2 = {k: v.copy() for k, v in params.items()}
        for g in grads[3:]:
            params, s = opt.step(params, g, s)
            p2, loaded = opt.step(p2, g, loaded)
        assert snapshot(params) == snapshot(p2)
    gate.set()


def test_roots_run_beside_the_step_in_a_thread():
    """The root job (NumPy LAPACK) runs on the executor while the caller keeps going."""
    started, release = threading.Event(), threading.Event()

    class SlowExecutor(ThreadPoolExecutor):
        def submit(self, fn, *a, **k):
            def wrapped():
                started.set()
                release.wait(10)
                return fn(*a, **k)
            return super().submit(wrapped)

    with SlowExecutor(1) as ex:
        opt = ao.shampoo(learning_rate=0.05, block_size=8, executor=ex, root_delay=3, precondition_every=3)
        params = {"w": np.ones((6, 5), np.float32), "b": np.zeros(5, np.float32)}
        s = opt.init(params)
        params, s = opt.step(params, _grads(1)[0], s)
        assert started.wait(10)
        params, s = opt.step(params, _grads(1, 1)[0], s)  # does not wait for the job
        assert s["pending"]["result"] is None
        release.set()
        s.settle()
        assert s["pending"]["result"] is not None


def test_dask_distributed_executor_equals_sync():
    """A ``dask.distributed`` client's executor (worker processes on loopback) as the root executor."""
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    grads = _grads(7)
    kw = dict(learning_rate=0.05, block_size=4, precondition_every=2, root_delay=1)
    p_sync, s_sync = _run(ao.shampoo(**kw), grads)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  host="127.0.0.1") as cluster, distributed.Client(cluster) as client:
        ex = client.get_executor(pure=False)
        p_dask, s_dask = _run(ao.shampoo(**kw, executor=ex), grads)
        s_dask.settle()
    assert snapshot(p_sync) == snapshot(p_dask)
    assert snapshot(dict(s_sync)) == snapshot(dict(s_dask))
