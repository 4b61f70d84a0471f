"""States a user can hold wrongly, over every registered optimizer (``ao.registry``), NumPy and torch.

- no state array or update carries an autograd graph (``nn.Parameter`` params, grads that require grad);
- a shallow copy taken before a step (``dict(state)``) is refused afterwards; ``ao.copy_state`` is the copy
  to step from later;
- two threads stepping one state: exactly one succeeds, the other gets a named ``ValueError``;
- finite but huge gradients whose update is not finite: rejected (state and params unchanged) or skipped
  and counted, never written.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import arrayopt as ao
from arrayopt._state_use import LeafPaths

torch = pytest.importorskip("torch")

NAMES = list(ao.registry.registered())
SHAPE_W, SHAPE_B = (16, 8), (8,)


def _make(name, **kw):
    return ao.registry.make(name, **kw)


def _arrays(lib, dtype, seed=0, scale=1.0, param=False):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=SHAPE_W) * scale).astype(np.float32)
    b = (rng.normal(size=SHAPE_B) * scale).astype(np.float32)
    if lib == "numpy":
        return {"w": w, "b": b}
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    def conv(x):
        t = torch.tensor(x, dtype=dt)
        return torch.nn.Parameter(t) if param else t
    return {"w": conv(w), "b": conv(b)}


def _stats(name, grads, requires_grad=False):
    """Eva and Eva-f take per-layer statistics (the registered ones read weights as (d_in, d_out))."""
    if name not in ("eva", "eva_f"):
        return {}
    w = grads["w"]
    if isinstance(w, np.ndarray):
        a, g = np.ones(SHAPE_W[0], np.float32), np.full(SHAPE_W[1], 0.5, np.float32)
    else:
        a = torch.ones(SHAPE_W[0], dtype=w.dtype, requires_grad=requires_grad)
        g = torch.full((SHAPE_W[1],), 0.5, dtype=w.dtype, requires_grad=requires_grad)
    return {"stats": {"w": (a, g) if name == "eva" else (a,)}}


def _walk(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _walk(v)
    elif hasattr(node, "shape"):
        yield node


def _snapshot(node):
    return [np.array(torch.as_tensor(a).float().numpy() if not isinstance(a, np.ndarray) else a, copy=True)
            for a in _walk(node)]


def _same(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))


# ---------------------------------------------------------------- 1. no autograd graph in the state


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_no_state_array_or_update_carries_an_autograd_graph(name, dtype):
    opt = _make(name)

    def grads(seed):
        g = _arrays("torch", dtype, seed=seed)
        return {k: v.requires_grad_(True) for k, v in g.items()}

    params = _arrays("torch", dtype, param=True)
    state = opt.init(params)
    for t in range(3):
        g = grads(t + 1)
        new, state = opt.step(params, g, state, **_stats(name, g, requires_grad=True))
        assert all(new[k] is params[k] for k in params)  # written in place, the Parameters handed back
        for a in _walk(state):
            assert not a.requires_grad and a.grad_fn is None, f"{name}: a state array records a graph"
    params = _arrays("torch", dtype, param=True)
    state = opt.init(params)
    for t in range(3):
        g = grads(t + 1)
        updates, state = opt.update(g, state, params, **_stats(name, g, requires_grad=True))
        for a in list(_walk(state)) + list(updates.values()):
            assert not a.requires_grad and a.grad_fn is None, f"{name}: update() leaks a graph"


# ---------------------------------------------------------------- 2. a shallow copy taken before a step


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_a_shallow_copy_stepped_from_after_a_step_raises_and_copy_state_steps_exactly(name, lib):
    opt = _make(name)
    params = _arrays(lib, "float32")
    state = opt.init(params)
    g = _arrays(lib, "float32", seed=1)
    params, state = opt.step(params, g, state, **_stats(name, g))
    backup, deep = dict(state), ao.copy_state(state)
    assert isinstance(deep["param_paths"], LeafPaths) and deep["param_paths"] is not state["param_paths"]
    keep = {k: v.clone() if lib == "torch" else v.copy() for k, v in params.items()}
    keep2 = {k: v.clone() if lib == "torch" else v.copy() for k, v in params.items()}
    g2 = _arrays(lib, "float32", seed=2)
    params, state = opt.step(params, g2, state, **_stats(name, g2))
    for call in (lambda: opt.step(keep, g2, backup, **_stats(name, g2)),
                 lambda: opt.update(g2, backup, keep, **_stats(name, g2))):
        with pytest.raises(ValueError, match=r"^state: already consumed"):
            call()
    with pytest.raises(ValueError, match="already consumed"):
        ao.copy_state(backup)
    # the deep copy steps as the original did
    again, _ = opt.step(keep2, g2, deep, **_stats(name, g2))
    assert _same(_snapshot(again), _snapshot(params))


def test_save_refuses_a_stale_shallow_copy_and_load_gives_a_fresh_token(tmp_path):
    opt = ao.adam(0.1)
    params = {"w": np.ones(4, np.float32)}
    state = opt.init(params)
    backup = dict(state)
    params, state = opt.step(params, {"w": np.ones(4, np.float32)}, state)
    with pytest.raises(ValueError, match="already consumed"):
        ao.save_state(backup, tmp_path / "b.npz")
    ao.save_state(state, tmp_path / "s.npz")
    loaded = ao.load_state(tmp_path / "s.npz", like=state)
    assert isinstance(loaded["param_paths"], LeafPaths) and loaded["param_paths"] == state["param_paths"]
    shallow = dict(loaded)
    opt.step(params, {"w": np.ones(4, np.float32)}, loaded)
    with pytest.raises(ValueError, match="already consumed"):
        opt.step(params, {"w": np.ones(4, np.float32)}, shallow)


def test_a_rejected_step_leaves_the_state_usable():
    opt = ao.adam(0.1)
    params = {"w": np.ones(4, np.float32)}
    state = opt.init(params)
    with pytest.raises(ValueError, match="grads leaf"):
        opt.step(params, {"w": np.full(4, np.nan, np.float32)}, state)
    opt.step(params, {"w": np.ones(4, np.float32)}, state)  # the token was given back


# ---------------------------------------------------------------- 3. two threads, one state


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_two_threads_stepping_one_state_one_wins_the_other_raises(name, lib):
    opt = _make(name)
    rounds = 12
    for r in range(rounds):
        state = opt.init(_arrays(lib, "float32"))
        g = _arrays(lib, "float32", seed=r + 1)
        barrier = threading.Barrier(2)
        outcome = [None, None]

        def run(i):
            params = _arrays(lib, "float32")
            barrier.wait()
            try:
                opt.step(params, g, state, **_stats(name, g))
                outcome[i] = "ok"
            except ValueError as e:
                outcome[i] = str(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcome.count("ok") == 1, f"{name} round {r}: {outcome}"
        loser = next(o for o in outcome if o != "ok")
        assert loser.startswith("state: ") and "consumed" in loser, loser


# ---------------------------------------------------------------- 4. huge finite gradients


def _huge(lib, seed):
    rng = np.random.default_rng(seed)
    w = (np.sign(rng.normal(size=SHAPE_W)) * 1e38).astype(np.float32)
    b = np.full(SHAPE_B, 1e38, np.float32)
    return {"w": w, "b": b} if lib == "numpy" else {"w": torch.tensor(w), "b": torch.tensor(b)}


# registered optimizers whose first update from 1e38 gradients (float32) is not finite
_NOT_FINITE_AT_ONCE = {"sonew_band4", "eva", "eva_f", "eva_s"}


@pytest.mark.parametrize("name, lib, backend", [
    (name, lib, backend) for name in NAMES for lib in ("numpy", "torch") for backend in (None, "reference")])
def test_a_non_finite_update_from_finite_gradients_is_never_written(name, lib, backend):
    for mode in ("raise", "skip"):
        opt = _make(name, on_nonfinite=mode)
        params = _arrays(lib, "float32")
        state = opt.init(params)
        with ao.dispatch.use_backend(backend):
            for t in range(5):
                g = _huge(lib, t)
                before_p, before_s = _snapshot(params), _snapshot(state)
                skipped = state["nonfinite_skipped"]
                try:
                    params, state = opt.step(params, g, state, **_stats(name, g))
                except ValueError as e:
                    assert mode == "raise" and str(e).startswith("update leaf"), str(e)
                    assert _same(_snapshot(params), before_p) and _same(_snapshot(state), before_s)
                    break
                except torch.linalg.LinAlgError:
                    # torch's SVD raises on the overflowed sketch (NumPy's returns NaN, which the
                    # sketch update detects): rejected before anything was written
                    assert name == "sketchy" and lib == "torch"
                    assert _same(_snapshot(params), before_p) and _same(_snapshot(state), before_s)
                    break
                assert all(np.isfinite(a).all() for a in _snapshot(params)), f"{name} step {t}: params not finite"
                if state["nonfinite_skipped"] != skipped:
                    assert _same(_snapshot(params), before_p)
                elif t == 0:
                    assert name not in _NOT_FINITE_AT_ONCE, f"{name}: a non-finite first step was written"
            else:
                assert mode == "skip" or name not in _NOT_FINITE_AT_ONCE


@pytest.mark.parametrize("name", sorted(_NOT_FINITE_AT_ONCE) + ["sgd"])
def test_update_rejects_or_skips_a_non_finite_update(name):
    for mode in ("raise", "skip"):
        opt = _make(name, on_nonfinite=mode)
        params = _arrays("numpy", "float32")
        state = opt.init(params)
        for t in range(5):
            g = _huge("numpy", t)
            before = _snapshot(state)
            try:
                updates, new = opt.update(g, state, params, **_stats(name, g))
            except ValueError as e:
                assert mode == "raise" and str(e).startswith("update leaf") and _same(_snapshot(state), before)
                break
            assert all(np.isfinite(u).all() for u in updates.values())
            if new["nonfinite_skipped"]:
                assert all(not u.any() for u in updates.values())
                break
            state = new
        else:
            pytest.fail(f"{name}: five steps of 1e38 gradients were neither rejected nor skipped")
