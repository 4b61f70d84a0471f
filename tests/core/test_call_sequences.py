"""Random sequences of valid and invalid calls against a model that sees only the valid ones.

A hypothesis state machine (``hypothesis.stateful``) drives one registered optimizer on a
small params tree (a 6×4 matrix, a 4-vector, a 3×3 matrix; NumPy or torch, float32) through
random sequences of:

- ``init`` (again, on the current params); ``step`` with finite gradients; ``update`` then
  ``apply_updates``;
- a bad call (``step`` or ``update``): NaN/Inf in one gradient leaf, a wrong shape, a wrong
  dtype, an integer gradient, a missing or extra key, an empty tree, a leaf from the other
  namespace. Each must raise its named ``ValueError``/``TypeError`` and leave the state usable;
- a non-finite gradient through the same optimizer built with ``on_nonfinite="skip"``: the
  skipped-step counter grows by one, nothing else in the state changes, params are unchanged;
- ``save_state``/``load_state(like=...)``: the loaded state equals the saved one bit for bit,
  and either one is stepped on;
- ``copy_state`` kept aside, and later the run resumed from that copy (with the params of
  that moment);
- a consumed state, a stale shallow copy (``dict(state)`` taken before a step) given to
  ``step``/``update``/``copy_state``/``save_state``: a named ``ValueError``;
- a step from a fresh shallow copy (valid: it consumes the state it shares a token with);
- two threads stepping one state behind a barrier: exactly one succeeds, the other raises a
  named ``ValueError`` and writes nothing.

The model is a second optimizer object of the same configuration that runs only the valid
calls, in the same order, on params and gradients of its own. When the run resumes from a
kept copy, the model is rebuilt by replaying its log of valid calls from ``init``, so
neither side relies on ``copy_state`` to be right. After every rule the params and the
state of both must be bit-identical (``_arrays.snapshot``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, \
    run_state_machine_as_test

import arrayopt as ao
import records  # noqa: F401  (loads every record module first; records_eva imports it)
from _arrays import snapshot
from records_eva import fed_stats

torch = pytest.importorskip("torch")

SHAPES = {"w": (6, 4), "b": (4,), "c": (3, 3)}
LEAVES = tuple(SHAPES)
LIBS = ("numpy", "torch")

# settings that reach the preconditioned steps of the roots-based optimizers within a short run
_EARLY = {
    "shampoo": {"precondition_every": 3, "start_preconditioning_step": 2},
    "shampoo_ec": {"precondition_every": 3, "start_preconditioning_step": 2},
    "sketchy": {"update_every": 3},
}
_EXECUTOR = ThreadPoolExecutor(max_workers=2)  # asynchronous Shampoo roots (one job at a time per state)


def _factories():
    """name -> (**kw) -> optimizer: every registered optimizer, plus Shampoo with asynchronous roots."""
    out = {name: (lambda name=name, **kw: ao.registry.make(name, **_EARLY.get(name, {}), **kw))
           for name in ao.registry.registered()}
    out["shampoo_async"] = lambda **kw: ao.registry.make("shampoo", executor=_EXECUTOR, **_EARLY["shampoo"], **kw)
    return out


FACTORIES = _factories()
NAMES = list(FACTORIES)
# the optimizers that take per-layer statistics (stats=, derived from the gradients as in records_eva)
_FED = {"eva", "eva_f"}


def _tree(lib, seed, scale=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    out = {k: (rng.normal(size=s) * scale).astype(dtype) for k, s in SHAPES.items()}
    return out if lib == "numpy" else {k: torch.from_numpy(v) for k, v in out.items()}


def _copy_tree(lib, tree):
    return {k: (v.clone() if lib == "torch" else v.copy()) for k, v in tree.items()}


def _bits(tree):
    """``snapshot(tree)`` without the result of a settled root job (``state["pending"]["result"]``):
    settling (``copy_state``, ``save_state`` do it) fetches that result early and changes no step."""
    snap = snapshot(tree)
    if isinstance(snap, dict) and isinstance(snap.get("pending"), dict):
        snap["pending"] = {k: v for k, v in snap["pending"].items() if k != "result"}
    return snap


def _in_flight(state) -> bool:
    """An asynchronous root job is pending and not yet settled."""
    pend = state.get("pending")
    return isinstance(pend, dict) and pend["result"] is None


def _other_namespace(lib, a):
    return torch.from_numpy(np.asarray(a)) if lib == "numpy" else a.numpy()


def _bad_grads(lib, kind, leaf, grads):
    """``(bad grads, error type, regex)`` for one kind of bad gradient tree."""
    g = dict(grads)
    if kind in ("nan", "inf"):
        bad = _copy_tree(lib, {leaf: grads[leaf]})[leaf]
        bad.reshape(-1)[len(bad.reshape(-1)) // 2] = float(kind) * (1 if kind == "nan" else -1)
        g[leaf] = bad
        return g, ValueError, rf"^grads leaf \['{leaf}'\]: contains NaN or Inf"
    if kind == "shape":
        other = next(k for k in LEAVES if SHAPES[k] != SHAPES[leaf])
        g[leaf] = grads[other]
        return g, ValueError, rf"^grads leaf \['{leaf}'\]: shape"
    if kind in ("dtype", "int"):
        dt = np.float64 if kind == "dtype" else np.int32
        g[leaf] = _tree(lib, 0, dtype=dt)[leaf]
        return g, TypeError, rf"^grads leaf \['{leaf}'\]: dtype {np.dtype(dt).name}"
    if kind == "missing":
        del g[leaf]
        return g, ValueError, rf"^grads: tree structure differs .*missing keys \['{leaf}'\]"
    if kind == "extra":
        g["z"] = grads[leaf]
        return g, ValueError, r"^grads: tree structure differs .*extra keys \['z'\]"
    if kind == "empty":
        return {}, ValueError, r"^grads: empty tree"
    if kind == "namespace":
        g[leaf] = _other_namespace(lib, grads[leaf])
        return g, TypeError, rf"^grads leaf \['{leaf}'\]: array namespace"
    raise AssertionError(kind)


BAD_KINDS = ("nan", "inf", "shape", "dtype", "int", "missing", "extra", "empty", "namespace")
CONSUMED = r"^state: .*consumed"
SEEDS = st.integers(0, 2**16)
SCALES = st.sampled_from([0.01, 1.0, 100.0])
CALLS = st.sampled_from(["step", "update"])


class Side:
    """One optimizer run: params, state and the optimizer objects (raising and skipping)."""

    def __init__(self, name, lib, seed):
        self.lib, self.seed = lib, seed
        self.opt = FACTORIES[name]()
        self.skipper = FACTORIES[name](on_nonfinite="skip")
        self.fed = name in _FED
        self.params = _tree(lib, seed)
        self.state = self.opt.init(self.params)

    def stats(self, grads):
        return {"stats": fed_stats(grads, self.opt.weight_layout)} if self.fed else {}

    def call(self, call, grads, state=None, params=None, opt=None, stats_from=None):
        """``step`` or ``update`` + ``apply_updates``; returns ``(new params, new state)``."""
        opt = opt or self.opt
        state = self.state if state is None else state
        params = self.params if params is None else params
        kw = self.stats(grads if stats_from is None else stats_from)
        if call == "step":
            return opt.step(params, grads, state, **kw)
        updates, new_state = opt.update(grads, state, params, **kw)
        return ao.apply_updates(params, updates), new_state

    def replay(self, log):
        """Back to ``init`` on the first params, then the valid calls of ``log``."""
        self.params = _tree(self.lib, self.seed)
        self.state = self.opt.init(self.params)
        for entry in log:
            self.apply(entry)

    def apply(self, entry):
        kind, *args = entry
        if kind == "init":
            self.state = self.opt.init(self.params)
        elif kind == "call":
            call, seed, scale = args
            self.params, self.state = self.call(call, _tree(self.lib, seed, scale))
        elif kind == "skip":
            call, seed, leaf = args
            good = _tree(self.lib, seed)
            bad, _, _ = _bad_grads(self.lib, "nan", leaf, good)
            self.params, self.state = self.call(call, bad, opt=self.skipper, stats_from=good)
        else:
            raise AssertionError(kind)


def machine(name, lib, tmp_dir):
    """The state machine class for one optimizer and one array library."""

    class CallSequences(RuleBasedStateMachine):

        @initialize(seed=SEEDS)
        def start(self, seed):
            self.sut = Side(name, lib, seed)
            self.model = Side(name, lib, seed)
            self.log = []          # the valid calls since the model's init
            self.consumed = []     # states a valid call consumed
            self.shallow = []      # dict(state) taken from the current state
            self.stale = []        # shallow copies whose state a valid call has consumed since
            self.kept = []         # (copy_state(state), params copy, the log then, snapshot)
            self.path = os.path.join(tmp_dir, "state.npz")

        # ------------------------------------------------------------ bookkeeping

        def _valid(self, entry, new_params, new_state, also_consumed=()):
            """The SUT took a valid call that consumed its state: record it, run it on the model."""
            for s in (self.sut.state, *also_consumed):
                self.consumed = (self.consumed + [s])[-4:]
            self.stale = (self.stale + self.shallow)[-3:]
            self.shallow = []
            self.sut.params, self.sut.state = new_params, new_state
            self.log.append(entry)
            self.model.apply(entry)

        def _replaced(self, new_state):
            """The SUT's state replaced without being consumed (init, load, resume)."""
            self.sut.state = new_state
            self.shallow = []

        def _expect_untouched(self, fn, exc, match):
            """``fn()`` raises ``exc`` matching ``match``; the SUT's params and state are as they were."""
            before_p, before_s = snapshot(self.sut.params), _bits(self.sut.state)
            with pytest.raises(exc, match=match):
                fn()
            assert snapshot(self.sut.params) == before_p, "a rejected call wrote the params"
            assert _bits(self.sut.state) == before_s, "a rejected call changed the state"

        # ------------------------------------------------------------ valid calls

        @rule()
        def init_again(self):
            self._replaced(self.sut.opt.init(self.sut.params))
            self.log.append(("init",))
            self.model.apply(("init",))

        @rule(call=CALLS, seed=SEEDS, scale=SCALES)
        def valid_call(self, call, seed, scale):
            new_params, new_state = self.sut.call(call, _tree(lib, seed, scale))
            assert new_state is not self.sut.state and new_state["consumed"] is False
            self._valid(("call", call, seed, scale), new_params, new_state)

        @rule(call=CALLS, seed=SEEDS, leaf=st.sampled_from(LEAVES))
        def skipped_nonfinite_call(self, call, seed, leaf):
            good = _tree(lib, seed)
            bad, _, _ = _bad_grads(lib, "nan", leaf, good)
            before_p, before_s = snapshot(self.sut.params), _bits(self.sut.state)
            count, skipped = self.sut.state["count"], self.sut.state["nonfinite_skipped"]
            if call == "step":
                new_params, new_state = self.sut.call("step", bad, opt=self.sut.skipper, stats_from=good)
            else:
                updates, new_state = self.sut.skipper.update(bad, self.sut.state, self.sut.params,
                                                             **self.sut.stats(good))
                assert all(not bool((u != 0).any()) for u in updates.values()), "a skipped update is not zero"
                new_params = ao.apply_updates(self.sut.params, updates)
            assert new_state["count"] == count and new_state["nonfinite_skipped"] == skipped + 1
            if call == "step":
                assert snapshot(new_params) == before_p, "a skipped step wrote the params"
            after = _bits(new_state)
            after["nonfinite_skipped"] -= 1
            assert after == before_s, "a skipped step changed more than the skip counter"
            self._valid(("skip", call, seed, leaf), new_params, new_state)

        @rule(call=CALLS, seed=SEEDS)
        def call_from_a_fresh_shallow_copy(self, call, seed):
            shallow = dict(self.sut.state)
            if _in_flight(shallow):  # a plain dict lost the job's future: refused by name
                self._expect_untouched(lambda: self.sut.call(call, _tree(lib, seed), state=shallow), ValueError,
                                       r"^state\['pending'\]: a root job is in flight but its future was lost")
                return
            new_params, new_state = self.sut.call(call, _tree(lib, seed), state=shallow)
            self._valid(("call", call, seed, 1.0), new_params, new_state, also_consumed=(shallow,))

        @rule(call=CALLS, seed=SEEDS)
        def two_threads_one_state(self, call, seed):
            grads = _tree(lib, seed)
            copies = [_copy_tree(lib, self.sut.params) for _ in range(2)]
            before = snapshot(self.sut.params)
            barrier = threading.Barrier(2)
            outcome = [None, None]

            def run(i):
                barrier.wait()
                try:
                    outcome[i] = self.sut.call(call, grads, params=copies[i])
                except ValueError as e:
                    outcome[i] = e

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            won = [i for i in range(2) if isinstance(outcome[i], tuple)]
            assert len(won) == 1, f"two threads, one state: {outcome}"
            loser = outcome[1 - won[0]]
            assert isinstance(loser, ValueError) and str(loser).startswith("state: ") and \
                "consumed" in str(loser), repr(loser)
            assert snapshot(copies[1 - won[0]]) == before, "the thread that lost wrote its params"
            new_params, new_state = outcome[won[0]]
            self._valid(("call", call, seed, 1.0), new_params, new_state)

        @rule(use_loaded=st.booleans())
        def save_and_load(self, use_loaded):
            ao.save_state(self.sut.state, self.path)
            loaded = ao.load_state(self.path, like=self.sut.state)
            assert snapshot(loaded) == snapshot(self.sut.state), "load_state(save_state(s)) differs from s"
            assert loaded["param_paths"] is not self.sut.state["param_paths"], "a loaded state shares a token"
            if use_loaded:
                self._replaced(loaded)

        @rule()
        def keep_a_copy(self):
            kept = ao.copy_state(self.sut.state)
            assert kept["param_paths"] is not self.sut.state["param_paths"]
            self.kept = (self.kept + [(kept, _copy_tree(lib, self.sut.params), list(self.log),
                                       _bits(self.sut.state))])[-3:]

        @precondition(lambda self: self.kept)
        @rule(i=st.integers(0, 2))
        def resume_from_a_kept_copy(self, i):
            kept, params, log, snap = self.kept.pop(i % len(self.kept))
            assert _bits(kept) == snap, "a copy_state() copy changed after later steps"
            self.sut.params = params
            self._replaced(kept)
            self.log = log
            self.model.replay(self.log)

        @rule()
        def take_a_shallow_copy(self):
            self.shallow = (self.shallow + [dict(self.sut.state)])[-2:]

        # ------------------------------------------------------------ invalid calls

        @rule(call=CALLS, kind=st.sampled_from(BAD_KINDS), leaf=st.sampled_from(LEAVES), seed=SEEDS)
        def bad_call(self, call, kind, leaf, seed):
            good = _tree(lib, seed)
            bad, exc, match = _bad_grads(lib, kind, leaf, good)
            self._expect_untouched(lambda: self.sut.call(call, bad, stats_from=good), exc, match)
            assert not self.sut.state["param_paths"].consumed, "a rejected call kept the state's token"

        def _refused(self, state, what, seed):
            grads = _tree(lib, seed)
            if what in ("step", "update"):
                fn, match = (lambda: self.sut.call(what, grads, state=state)), CONSUMED
            elif what == "copy_state":
                fn, match = (lambda: ao.copy_state(state)), r"^state: already consumed"
            else:
                fn, match = (lambda: ao.save_state(state, self.path + ".refused.npz")), r"^state: already consumed"
            self._expect_untouched(fn, ValueError, match)
            assert not os.path.exists(self.path + ".refused.npz")

        @precondition(lambda self: self.consumed)
        @rule(i=st.integers(0, 3), what=st.sampled_from(["step", "update", "copy_state", "save_state"]), seed=SEEDS)
        def reuse_a_consumed_state(self, i, what, seed):
            self._refused(self.consumed[i % len(self.consumed)], what, seed)

        @precondition(lambda self: self.stale)
        @rule(i=st.integers(0, 2), what=st.sampled_from(["step", "update", "copy_state", "save_state"]), seed=SEEDS)
        def use_a_stale_shallow_copy(self, i, what, seed):
            self._refused(self.stale[i % len(self.stale)], what, seed)

        # ------------------------------------------------------------ the model

        @invariant()
        def matches_the_model(self):
            assert snapshot(self.sut.params) == snapshot(self.model.params), "params differ from the model's"
            assert _bits(self.sut.state) == _bits(self.model.state), "state differs from the model's"
            assert self.sut.state["consumed"] is False and not self.sut.state["param_paths"].consumed

    CallSequences.__name__ = f"CallSequences_{name}_{lib}"
    return CallSequences


def _run(name, lib, tmp_path, max_examples, steps):
    tmp_dir = tempfile.mkdtemp(dir=tmp_path)
    try:
        run_state_machine_as_test(machine(name, lib, tmp_dir),
                                  settings=settings(max_examples=max_examples, stateful_step_count=steps))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("name", NAMES)
def test_random_call_sequences_match_a_model_of_the_valid_calls(name, lib, tmp_path):
    _run(name, lib, tmp_path, max_examples=12, steps=40)


@pytest.mark.slow
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("name", NAMES)
def test_long_random_call_sequences_match_a_model_of_the_valid_calls(name, lib, tmp_path):
    _run(name, lib, tmp_path, max_examples=25, steps=50)
