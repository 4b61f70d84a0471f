"""``arrayopt.interop.optax.transform``: an ``optax.GradientTransformation`` that jits (compiles once)."""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao

jax = pytest.importorskip("jax", reason="the optax adapter needs jax")
optax = pytest.importorskip("optax", reason="the optax adapter needs optax (pip install arrayopt[jax])")
jnp = jax.numpy
from arrayopt.interop.optax import TransformState, transform  # noqa: E402


def _params(dtype):
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(5, 4)), dtype), "b": jnp.asarray(rng.normal(size=4), dtype)}


def _grads(steps, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return [{"w": jnp.asarray(rng.normal(size=(5, 4)), dtype), "b": jnp.asarray(rng.normal(size=4), dtype)}
            for _ in range(steps)]


def _jitted_run(tx, params, grads):
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(1)  # runs once per trace
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for g in grads:
        params, state = step(params, state, g)
    return params, state, len(traces)


# optax's adagrad puts eps inside the square root (g / sqrt(s + eps)); arrayopt's, like torch's,
# outside (g / (sqrt(s) + eps)): with eps = 0 the two are the same
MATCHING = {
    "sgd": (lambda: ao.sgd(0.1, momentum=0.9, nesterov=True), lambda: optax.sgd(0.1, 0.9, nesterov=True)),
    "adam": (lambda: ao.adam(0.05, b1=0.8, b2=0.99, eps=1e-6), lambda: optax.adam(0.05, b1=0.8, b2=0.99, eps=1e-6)),
    "adamw": (lambda: ao.adamw(0.05, weight_decay=0.1), lambda: optax.adamw(0.05, weight_decay=0.1)),
    "adagrad": (lambda: ao.adagrad(0.1, eps=0.0, initial_accumulator_value=0.1),
                lambda: optax.adagrad(0.1, initial_accumulator_value=0.1, eps=0.0)),
}


@pytest.mark.parametrize("name", list(MATCHING))
def test_jitted_trajectory_equals_optax_and_compiles_once(name):
    ours, theirs = MATCHING[name]
    grads = _grads(20, jnp.float64)
    p1, s1, traces = _jitted_run(transform(ours()), _params(jnp.float64), grads)
    p2, _, _ = _jitted_run(theirs(), _params(jnp.float64), grads)
    assert traces == 1
    assert isinstance(s1, TransformState) and int(s1.count) == 20
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(s1))
    for k in p1:
        np.testing.assert_allclose(np.asarray(p1[k]), np.asarray(p2[k]), rtol=1e-10, atol=1e-12, err_msg=k)
    # traced into the step: no host callback in its program
    assert "callback" not in _jaxpr(transform(ours()), jnp.float64, grads)


@pytest.mark.parametrize("make", [
    lambda: ao.adamw(ao.schedules.join([ao.schedules.linear_warmup(0.05, 3),
                                        ao.schedules.cosine_decay(0.05, 10, alpha=0.1)], [3]), weight_decay=0.1),
    lambda: ao.sgd(ao.schedules.piecewise_constant(0.1, {4: 0.5}), momentum=0.9, weight_decay=1e-2),
    lambda: ao.chain(ao.clip_by_global_norm(2.0), ao.scale(0.5),
                     ao.adagrad(ao.schedules.constant(0.1), weight_decay=1e-2)),
], ids=["adamw-warmup-cosine", "sgd-piecewise", "chain-clip-scale-adagrad"])
def test_first_order_with_arrayopt_schedules_is_traced_and_equals_the_numpy_path(make):
    grads = _grads(12, jnp.float64)
    p, state, traces = _jitted_run(transform(make()), _params(jnp.float64), grads)
    want = _numpy_run(make(), _params(jnp.float64), grads)
    assert traces == 1 and int(state.count) == 12
    for k in want:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-10, atol=1e-12, err_msg=k)
    assert "callback" not in _jaxpr(transform(make()), jnp.float64, grads)


def test_a_schedule_with_python_math_takes_its_learning_rate_from_the_host():
    import math

    def sched(step):
        return 0.05 * math.cos(0.1 * step)

    grads = _grads(4, jnp.float32)
    p, _, traces = _jitted_run(transform(ao.adam(sched)), _params(jnp.float32), grads)
    want = _numpy_run(ao.adam(sched), _params(jnp.float32), grads)
    assert traces == 1
    for k in want:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=1e-6, err_msg=k)
    assert _jaxpr(transform(ao.adam(sched)), jnp.float32, grads).count("pure_callback") == 1


def test_traced_adam_on_bfloat16_params_equals_the_numpy_path():
    grads = [{k: v.astype(jnp.bfloat16) for k, v in g.items()} for g in _grads(3, jnp.float32)]
    params = {k: v.astype(jnp.bfloat16) for k, v in _params(jnp.float32).items()}
    p, state, traces = _jitted_run(transform(ao.adam(0.05)), params, grads)
    assert traces == 1 and all(p[k].dtype == jnp.bfloat16 for k in p)
    want = _numpy_run(ao.adam(0.05), params, grads)
    for k in want:
        np.testing.assert_allclose(np.asarray(p[k], np.float32), np.asarray(want[k], np.float32),
                                   rtol=1e-2, atol=1e-2, err_msg=k)


def _jaxpr(tx, dtype, grads):
    """The text of the jaxpr of one ``tx.update`` on this file's params."""
    return str(jax.make_jaxpr(lambda p, s, g: tx.update(g, s, p))(_params(dtype), tx.init(_params(dtype)), grads[0]))


def _numpy_run(opt, params, grads):
    p = {k: np.array(v) for k, v in params.items()}
    s = opt.init(p)
    for g in grads:
        u, s = opt.update({k: np.array(g[k]) for k in p}, s, p)
        p = ao.apply_updates(p, u)
    return p


@pytest.mark.parametrize("make", [lambda: ao.shampoo(0.05, block_size=2, root_method="newton"),
                                  lambda: ao.partition(lambda p: {"w": "m", "b": "v"},
                                                       {"m": ao.sonew(0.05, eps=1e-3), "v": ao.adam(0.05)})],
                         ids=["shampoo", "partition"])
def test_host_path_in_a_jitted_optax_chain_equals_the_numpy_path(make):
    grads = _grads(10, jnp.float32)
    tx = optax.chain(optax.scale(1.0), transform(make()))
    p, state, traces = _jitted_run(tx, _params(jnp.float32), grads)
    want = _numpy_run(make(), _params(jnp.float32), grads)
    assert traces == 1 and int(state[1].count) == 10
    for k in want:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("make", [
    lambda: ao.shampoo(0.05, block_size=4, precondition_every=4, start_preconditioning_step=3, weight_decay=1e-2,
                       eps=1e-3),
    lambda: ao.shampoo(optax.cosine_decay_schedule(0.05, 15), block_size=8, precondition_every=5, b2=1.0,
                       graft="rmsprop_normalized", graft_per="block", statistics_every=2, ema_momentum=True,
                       relative_epsilon=False, eps=1e-4),
], ids=["adam-graft-decay", "block-graft-schedule"])
def test_shampoo_is_traced_into_the_jitted_step_and_equals_the_numpy_path(make):
    grads = _grads(15, jnp.float32)
    params = _params(jnp.float32)
    tx = transform(make())
    p, state, traces = _jitted_run(tx, params, grads)
    opt = make()
    want, s = {k: np.array(v) for k, v in params.items()}, opt.init({k: np.array(v) for k, v in params.items()})
    for g in grads:
        u, s = opt.update({k: np.array(v) for k, v in g.items()}, s, want)
        want = ao.apply_updates(want, u)
    assert traces == 1 and int(state.count) == 15
    for k in want:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=2e-5, err_msg=k)
    traced = state.as_state()
    for key in ("roots_step", "root_staleness", "root_jobs", "root_failures", "nonfinite_skipped"):
        assert int(traced[key]) == s[key], key
    assert s["root_jobs"] >= 3
    text = str(jax.make_jaxpr(lambda p, s, g: tx.update(g, s, p))(params, tx.init(params), grads[0]))
    assert "callback" not in text and "cond[" in text and "eigh" in text


def test_shampoo_with_a_pending_root_job_is_rejected():
    from arrayopt.shampoo.async_roots import InlineExecutor

    with pytest.raises(ValueError, match="opt: shampoo with an executor or root_delay > 0"):
        transform(ao.shampoo(0.05, executor=InlineExecutor()))
    with pytest.raises(ValueError, match="root_delay > 0"):
        transform(ao.shampoo(0.05, root_delay=1))


def test_what_traces_and_what_runs_on_the_host():
    from arrayopt.interop._optax_traced import traces

    class TwoRanks:
        rank, size = 0, 2

        def allgather(self, x):
            return [x, x]

    assert traces(ao.shampoo(0.05)) and traces(ao.chain(ao.scale(2.0), ao.sonew()))
    for opt in (ao.shampoo(0.05, root_method="newton"), ao.shampoo(0.05, preconditioner="eigenvalue_corrected"),
                ao.shampoo(0.05, comm=TwoRanks()), ao.chain(ao.scale(2.0), ao.shampoo(0.05, root_method="qr")),
                ao.partition(lambda p: {"w": "m", "b": "v"}, {"m": ao.sonew(), "v": ao.adam()})):
        assert not traces(opt), opt


@pytest.mark.parametrize("dtype,make,tol", [
    (jnp.float32, lambda: ao.sonew(0.05, band=1, eps=1e-3), 2e-5),
    (jnp.float64, lambda: ao.sonew(optax.cosine_decay_schedule(0.05, 10), band=2, graft="rmsprop_normalized",
                                   weight_decay=1e-2), 1e-9),
], ids=["float32", "float64-schedule-rmsprop"])
def test_sonew_is_traced_into_the_jitted_step_and_equals_the_numpy_path(dtype, make, tol):
    grads = _grads(10, dtype)
    tx = transform(make())
    p, state, traces = _jitted_run(tx, _params(dtype), grads)
    want = _numpy_run(make(), _params(dtype), grads)
    assert traces == 1 and int(state.count) == 10
    for k in want:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=tol, atol=tol, err_msg=k)
    # traced: SONew's jitted leaf function is in the step's program, and no host callback
    text = _jaxpr(tx, dtype, grads)
    assert "name=leaf" in text and "callback" not in text
    host = str(jax.make_jaxpr(lambda p, s, g: transform(make(), host=True).update(g, s, p))(
        _params(dtype), tx.init(_params(dtype)), grads[0]))
    assert "name=leaf" not in host


@pytest.mark.parametrize("make", [lambda: ao.sonew(0.05, eps=1e-3),
                                  lambda: ao.chain(ao.clip_by_global_norm(1.0), ao.adam(0.05))], ids=["sonew", "chain"])
def test_a_traced_step_skips_a_nonfinite_gradient(make):
    grads = _grads(3, jnp.float32)
    grads[1]["w"] = grads[1]["w"].at[2, 1].set(jnp.inf)
    p, state, _ = _jitted_run(transform(make()), _params(jnp.float32), grads)
    want = _numpy_run(make(), _params(jnp.float32), [grads[0], grads[2]])
    assert int(state.count) == 2 and int(state.leaves[1]) == 1  # nonfinite_skipped
    for k in want:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=2e-5, err_msg=k)


def test_optax_schedule_as_the_learning_rate_and_init_inside_jit():
    sched = optax.cosine_decay_schedule(0.05, 20)
    grads = _grads(5, jnp.float64)
    p1, _, traces = _jitted_run(transform(ao.adam(sched)), _params(jnp.float64), grads)
    p2, _, _ = _jitted_run(optax.adam(sched), _params(jnp.float64), grads)
    assert traces == 1
    for k in p1:
        np.testing.assert_allclose(np.asarray(p1[k]), np.asarray(p2[k]), rtol=1e-10, atol=1e-12)
    tx = transform(ao.adam(0.1))
    state = jax.jit(tx.init)(_params(jnp.float64))
    assert int(state.count) == 0 and state.skeleton == tx.init(_params(jnp.float64)).skeleton


def test_bad_inputs_raise_named_errors():
    with pytest.raises(TypeError, match="opt: expected an arrayopt optimizer"):
        transform(optax.adam(0.1))
    with pytest.raises(TypeError, match="host: expected a bool"):
        transform(ao.sonew(), host=1)
    tx = transform(ao.adam(0.1))
    with pytest.raises(TypeError, match="state: expected the TransformState"):
        tx.update(_grads(1, jnp.float64)[0], optax.adam(0.1).init(_params(jnp.float64)))
