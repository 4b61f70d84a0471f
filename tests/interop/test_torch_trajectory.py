"""50-step float64 trajectories agree with torch.optim (rtol 1e-10) on every path."""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao
from records import CASE_IDS, CASES

TORCH_CASES = [(c, i) for c, i in zip(CASES, CASE_IDS) if c[0].torch_class]

torch = pytest.importorskip("torch", reason="torch is the trajectory oracle (installed by the test extra)")


def _torch_trajectory(rec, config, p0, grads_fn, steps):
    w = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    lr = config["learning_rate"]
    kwargs = rec.torch_kwargs({**config, "learning_rate": lr(0) if callable(lr) else lr})
    opt = getattr(torch.optim, rec.torch_class)([w], **kwargs, foreach=False)
    for t in range(steps):
        if callable(lr):
            opt.param_groups[0]["lr"] = lr(t)
        w.grad = torch.tensor(grads_fn(w.detach().numpy(), t))
        opt.step()
    return w.detach().numpy().copy()


@pytest.mark.parametrize("rec,config", [c for c, _ in TORCH_CASES], ids=[i for _, i in TORCH_CASES])
@pytest.mark.parametrize("path", ["numpy-numba", "numpy-reference", "torch-numba", "torch-reference"])
def test_trajectory_matches_torch_optim(rec, config, path):
    rng = np.random.default_rng(11)
    p0 = rng.normal(size=(7, 5))
    a = rng.uniform(0.2, 3.0, size=(7, 5))
    noise = rng.normal(size=(50, 7, 5)) * 0.1

    def grads_fn(w, t):  # a gradient that depends on the trajectory, so errors would compound
        return a * w + noise[t]

    want = _torch_trajectory(rec, config, p0, grads_fn, 50)
    lib, backend = path.split("-")
    opt = rec.factory(**config)
    params = [p0.copy() if lib == "numpy" else torch.tensor(p0)]
    state = opt.init(params)
    with ao.dispatch.use_backend("reference" if backend == "reference" else "numba_cpu"):
        for t in range(50):
            w = params[0] if lib == "numpy" else params[0].numpy()
            g = grads_fn(w, t)
            params, state = opt.step(params, [g if lib == "numpy" else torch.tensor(g)], state)
    got = params[0] if lib == "numpy" else params[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
