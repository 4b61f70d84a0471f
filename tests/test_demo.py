"""The main job (``python -m arrayopt.demo``): the model's backprop and a smoke run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from arrayopt.demo import model


def _numeric_grad(params, x, key, eps=1e-6):
    p = params[key]
    g = np.empty_like(p)
    flat, gflat = p.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up, _ = model.forward(params, x)
        lp = model._cross_entropy(up, x)
        flat[i] = old - eps
        down, _ = model.forward(params, x)
        lm = model._cross_entropy(down, x)
        flat[i] = old
        gflat[i] = (lp - lm) / (2 * eps)
    return g


def test_backprop_matches_finite_differences_float64():
    rng = np.random.default_rng(0)
    # the demo's shape in miniature: tanh hidden layers, linear code layer (3 units), sigmoid output
    sizes = (7, 6, 5, 3, 5, 6, 7)
    params = model.init_params(rng, sizes, dtype=np.float64)
    for k in params:  # non-zero biases so that their gradients are exercised too
        if k.startswith("b"):
            params[k] = rng.normal(0.0, 0.3, params[k].shape)
    x = rng.uniform(0.0, 1.0, size=(4, sizes[0]))
    value, grads = model.loss_and_grads(params, x)
    assert value == pytest.approx(model.loss(params, x), rel=1e-12)
    assert list(grads) == list(params)
    for key in params:
        num = _numeric_grad(params, x, key)
        np.testing.assert_allclose(grads[key], num, rtol=1e-6, atol=1e-8, err_msg=key)


def test_code_layer_is_linear_and_float32_stays_float32():
    rng = np.random.default_rng(1)
    params = model.init_params(rng)  # the demo's default 64-256-128-64-16-64-128-256-64
    x = rng.uniform(0.0, 1.0, size=(8, 64)).astype(np.float32)
    _, acts = model.forward(params, x)
    code = acts[4]
    assert code.shape == (8, 16)
    np.testing.assert_allclose(code, acts[3] @ params["W4"] + params["b4"], rtol=1e-6)  # linear code
    np.testing.assert_allclose(acts[3], np.tanh(acts[2] @ params["W3"] + params["b3"]), rtol=1e-5, atol=1e-6)
    value, grads = model.loss_and_grads(params, x)
    assert math.isfinite(value)
    assert all(g.dtype == np.float32 and g.shape == params[k].shape for k, g in grads.items())
    # the loss is bounded below by the entropy of the targets
    assert value > model.target_entropy(x).mean()


def test_main_smoke_run(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the 'demo' extra)")
    pytest.importorskip("matplotlib", reason="the demo needs matplotlib (the 'demo' extra)")
    from arrayopt.demo.__main__ import main

    out = tmp_path / "out"
    rc = main(["--epochs", "1", "--optimizers", "sgd,adam", "--lr", "sgd=0.01", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "train loss" in printed and "opt steps/s" in printed and "state bytes" in printed
    assert "wall time" in printed
    png = out / "losses.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| optimizer |" in md and "sgd" in md and "adam" in md
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["epochs"] == 1 and doc["config"]["lr_overrides"] == {"sgd": 0.01}
    results = {r["optimizer"]: r for r in doc["results"]}
    assert list(results) == ["sgd", "adam"]
    for name, r in results.items():
        assert not r["diverged"], name
        for key in ("initial_train_loss", "final_train_loss", "final_test_loss",
                    "opt_steps_per_s", "train_steps_per_s"):
            assert r[key] is not None and math.isfinite(r[key]), (name, key)
        assert r["final_train_loss"] < r["initial_train_loss"], name
        assert r["steps"] == doc["config"]["steps_per_epoch"] == len(r["step_loss"])
        assert r["state_bytes"] > 0
    # Adam keeps two moments per param, SGD with momentum one
    assert results["adam"]["state_bytes"] > results["sgd"]["state_bytes"]


def test_main_rejects_unknown_optimizer(capsys):
    from arrayopt.demo.__main__ import main

    with pytest.raises(SystemExit):
        main(["--optimizers", "no-such-optimizer"])
    assert "no-such-optimizer" in capsys.readouterr().err


def test_diverging_run_is_reported_not_raised():
    from arrayopt.demo import train

    class BlowsUpAtStep3:  # the two methods train() uses; params turn NaN on the 3rd step
        def init(self, params):
            return {"count": 0}

        def step(self, params, grads, state):
            if state["count"] == 2:
                for p in params.values():
                    p[...] = np.nan
            return params, {"count": state["count"] + 1}

    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, size=(64, 8)).astype(np.float32)
    params = model.init_params(rng, (8, 6, 3, 6, 8))
    r = train.train("boom", BlowsUpAtStep3(), params, x[:48], x[48:], epochs=2, batch_size=8, seed=0)
    assert r.diverged and r.error == "non-finite loss at step 4"
    assert r.steps == 3 == len(r.step_loss)
    assert math.isfinite(r.initial_train_loss) and not math.isfinite(r.final_train_loss)
    assert np.isfinite(params["W1"]).all()  # the caller's params are never touched
