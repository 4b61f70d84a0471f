"""Traced steps never stall: 30 jitted steps of every optimizer that traces, in a subprocess with a
timeout (a stalled step fails the test instead of hanging the run), and Shampoo's root refresh
issuing at most one LAPACK ``eigh`` per compiled computation (XLA's CPU runtime runs independent
custom calls concurrently, and concurrent LAPACK ``eigh`` calls in a ``cond`` can deadlock)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

import arrayopt as ao

jax = pytest.importorskip("jax", reason="the optax adapter needs jax")
optax = pytest.importorskip("optax", reason="the optax adapter needs optax (pip install arrayopt[jax])")
jnp = jax.numpy
from arrayopt.interop._optax_traced import traces  # noqa: E402
from arrayopt.interop.optax import transform  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# beyond the registered ones: the transforms and a chain of traced parts
EXTRA = {"scale": "ao.scale(0.5)", "clip_by_global_norm": "ao.clip_by_global_norm(1.0)",
         "chain": "ao.chain(ao.clip_by_global_norm(1.0), ao.scale(0.5), ao.adam(1e-3))",
         "shampoo_every_1": "ao.shampoo(1e-3, block_size=16, precondition_every=1, start_preconditioning_step=1)"}


def _traced_names():
    return [n for n in ao.registry.registered() if traces(ao.registry.make(n))]


def test_the_list_covers_every_traced_registered_optimizer():
    names = _traced_names()
    assert {"sgd", "adam", "sonew_tridiag", "shampoo"} <= set(names)
    assert all(traces(eval(code, {"ao": ao})) for code in EXTRA.values())


SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np, jax, jax.numpy as jnp, optax
    import arrayopt as ao
    from arrayopt.interop.optax import transform

    sizes = [40, 48, 32, 24, 10]
    rng = np.random.default_rng(0)
    params0 = {f"w{i}": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)
               for i, (a, b) in enumerate(zip(sizes, sizes[1:]))}
    params0.update({f"b{i}": jnp.zeros(b, jnp.float32) for i, b in enumerate(sizes[1:])})
    x = jnp.asarray(rng.normal(size=(32, sizes[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 32))

    def loss(p):
        h = x
        for i in range(len(sizes) - 1):
            h = h @ p[f"w{i}"] + p[f"b{i}"]
            h = jnp.tanh(h) if i < len(sizes) - 2 else h
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    for name, code in [a.split("=", 1) for a in sys.argv[1:]]:
        tx = transform(eval(code) if code else ao.registry.make(name, precondition_every=3,
                                                                start_preconditioning_step=1)
                       if name.startswith("shampoo") else ao.registry.make(name))

        @jax.jit
        def step(p, s):
            l, g = jax.value_and_grad(loss)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, l

        params, state = params0, tx.init(params0)
        for _ in range(30):
            params, state, l = step(params, state)
        l.block_until_ready()
        assert int(state.count) == 30 and np.isfinite(float(l)), name
        print("done", name, flush=True)
''')


@pytest.mark.slow  # a compile and 30 steps per optimizer, in a fresh process
def test_thirty_jitted_steps_of_every_traced_optimizer_finish_under_a_timeout():
    names = _traced_names()
    args = [f"{n}=" for n in names] + [f"{n}={code}" for n, code in EXTRA.items()]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True,
                             timeout=600, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        done = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"the jitted steps stalled (finished: {done.split()!r})")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line.split()[1] for line in out.stdout.splitlines() if line.startswith("done")] == \
        [a.split("=", 1)[0] for a in args]


def test_shampoo_root_refresh_has_at_most_one_eigh_per_compiled_computation():
    sizes = [40, 48, 32, 24, 10]
    params = {f"w{i}": jnp.ones((a, b), jnp.float32) for i, (a, b) in enumerate(zip(sizes, sizes[1:]))}
    params.update({f"b{i}": jnp.zeros(b, jnp.float32) for i, b in enumerate(sizes[1:])})
    tx = transform(ao.shampoo(1e-3, block_size=16, precondition_every=3))
    text = jax.jit(lambda p, s: tx.update(p, s, p)).lower(params, tx.init(params)).compile().as_text()
    per_computation = [len(re.findall(r"custom_call_target=\"[^\"]*(syevd|eigh)", body))
                       for body in re.split(r"\n(?=\S)", text)]
    assert sum(per_computation) >= 3  # several (size, exponent) groups
    assert max(per_computation) == 1, per_computation
