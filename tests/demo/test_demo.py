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
    rc = main(["--epochs", "1", "--seeds", "2", "--optimizers", "sgd,adam", "--lr", "sgd=0.01", "--jobs", "1",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "train loss" in printed and "opt steps/s" in printed and "state bytes" in printed
    assert "±" in printed and "over the 2 seeds 0..1" in printed
    assert "wall time" in printed
    png = out / "losses.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| optimizer |" in md and "sgd" in md and "adam" in md and "±" in md
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["epochs"] == 1 and doc["config"]["lr_overrides"] == {"sgd": 0.01}
    assert doc["config"]["seeds"] == [0, 1] and doc["config"]["task"] == "digits"
    assert [(r["optimizer"], r["seed"]) for r in doc["results"]] == [("sgd", 0), ("adam", 0), ("sgd", 1), ("adam", 1)]
    # the seed changes the split and the initial params, so the two runs differ
    assert doc["results"][0]["final_train_loss"] != doc["results"][2]["final_train_loss"]
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


def test_bfloat16_params_are_stored_and_stepped_in_bfloat16(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the 'demo' extra)")
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="--dtype bfloat16 needs ml_dtypes (the 'demo' extra)")
    from arrayopt.demo import cli

    bf16 = np.dtype(ml_dtypes.bfloat16)
    params = model.init_params(np.random.default_rng(0), sizes=(6, 5, 2, 5, 6), dtype=bf16)
    x = np.random.default_rng(1).uniform(size=(4, 6)).astype(np.float32)
    value, grads = model.loss_and_grads(params, x)
    assert all(g.dtype == bf16 for g in grads.values())
    # the model computes in float32 on the rounded params
    up = {k: v.astype(np.float32) for k, v in params.items()}
    value32, grads32 = model.loss_and_grads(up, x)
    assert value == value32
    assert all(np.array_equal(grads[k], grads32[k].astype(bf16)) for k in params)
    rc = cli.main(["--epochs", "1", "--seeds", "1", "--optimizers", "sonew_tridiag", "--dtype", "bfloat16",
                   "--jobs", "1", "--no-progress", "--out", str(tmp_path / "out")])
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["config"]["dtype"] == "bfloat16"
    for r in doc["results"]:
        assert not r["diverged"] and r["final_train_loss"] < r["initial_train_loss"], r["optimizer"]


def test_runs_in_parallel_processes_equal_the_sequential_runs(tmp_path):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the 'demo' extra)")
    from arrayopt.demo import cli

    losses = {}
    for jobs in ("1", "2"):
        out = tmp_path / jobs
        assert cli.main(["--epochs", "1", "--seeds", "2", "--optimizers", "adam", "--jobs", jobs,
                         "--no-progress", "--out", str(out)]) == 0
        doc = json.loads((out / "results.json").read_text())
        assert doc["config"]["jobs"] == int(jobs)
        losses[jobs] = [(r["seed"], r["step_loss"]) for r in doc["results"]]
    assert losses["1"] == losses["2"]


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


class _Digits:
    """The two arrays of :class:`arrayopt.demo.data.Digits` that training reads."""

    def __init__(self, seed=0, n=56, features=8):
        x = np.random.default_rng(seed).uniform(0.0, 1.0, size=(n, features)).astype(np.float32)
        self.train, self.test = x[:48], x[48:]


def test_progress_bar_shows_compilation_and_keeps_it_out_of_the_rate():
    """On a cold Numba cache the first step compiles for seconds; the bar used to count it as
    a step (``1/880 [00:11<2:51:00, 11.67s/step]``). Now the bar says so during the warm-up
    step and restarts its clock after it."""
    pytest.importorskip("tqdm", reason="the progress bar needs tqdm (the 'demo' extra)")
    import io
    import re
    import time

    import arrayopt as ao
    from arrayopt.demo import cli

    class CompilesOnFirstStep:
        def __init__(self):
            self.opt, self.compiled = ao.adam(1e-3), False

        def init(self, params):
            return self.opt.init(params)

        def step(self, params, grads, state):
            if not self.compiled:
                time.sleep(1.5)  # what a cold Numba cache costs, shortened
                self.compiled = True
            return self.opt.step(params, grads, state)

    out = io.StringIO()
    rng = np.random.default_rng(0)
    params = model.init_params(rng, (8, 6, 3, 6, 8))
    r = cli.run_one("cold", CompilesOnFirstStep(), params, _Digits(), epochs=2, batch_size=8, seed=0,
                    description="", progress=cli._Progress(True, file=out))
    text = out.getvalue()
    assert cli.COMPILING in text and "compiling kernels (first run only)" in text
    assert r.warmup_seconds >= 1.5 and r.train_seconds < 1.5 and r.steps == 12
    final = text.replace("\r", "\n").strip().splitlines()[-1]
    assert "12/12" in final, final
    minutes, seconds = map(int, re.search(r"\[(\d+):(\d+)<", final).groups())
    assert minutes * 60 + seconds < 1.5, f"the warm-up is counted in the bar's time: {final}"
    assert "s/step" not in final or float(re.search(r"([\d.]+)s/step", final).group(1)) < 1.0, final


def test_table_and_plot_use_one_loss_convention(tmp_path):
    """The plot showed the loss minus the target entropy while the table showed the raw loss;
    both now show the former, and both say so."""
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the 'demo' extra)")
    from arrayopt.demo import report, train

    r = train.RunResult(name="adam", steps=2, opt_seconds=0.1, train_seconds=0.2, state_bytes=8,
                        step_loss=[20.0, 19.0], step_excess=[6.0, 5.0], step_time=[0.1, 0.2])
    r.evals = [{"epoch": 0, "step": 0, "seconds": 0.0, "train_loss": 21.0, "test_loss": 21.5,
                "train_excess": 7.25, "test_excess": 7.5},
               {"epoch": 1, "step": 2, "seconds": 0.2, "train_loss": 18.0, "test_loss": 18.5,
                "train_excess": 4.25, "test_excess": 4.5}]
    table = report.format_table([r])
    header, _, row = table.splitlines()
    assert f"train {report.LOSS}" in header and f"test {report.LOSS}" in header
    assert "4.250" in row and "4.500" in row and "18.000" not in row
    md = report.markdown_table([r])
    assert report.LOSS in md and "4.250" in md
    fig = report.plot(str(tmp_path / "losses.png"), [r])
    assert report.LOSS in fig.axes[0].get_ylabel()
    assert (tmp_path / "losses.png").is_file()


def test_every_row_of_the_plot_has_its_own_colour(tmp_path):
    """The plot cycled ten colours over the thirteen registered optimizers; now every row of the
    main job has its own colour, and neighbouring rows differ in line style too."""
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the 'demo' extra)")
    import arrayopt as ao
    from arrayopt.demo import report, train

    rows = []
    for name in ao.registry.registered():
        r = train.RunResult(name=name, steps=2, opt_seconds=0.1, train_seconds=0.2, state_bytes=8,
                            step_loss=[20.0, 19.0], step_excess=[6.0, 5.0], step_time=[0.1, 0.2])
        rows.append(r)
    fig = report.plot(str(tmp_path / "losses.png"), rows)
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() not in ("None", "")]
    assert len(lines) == len(rows) >= 13
    colours = [ln.get_color() for ln in lines]
    styles = [ln.get_linestyle() for ln in lines]
    assert len(set(colours)) == len(rows)
    assert all(a != b for a, b in zip(styles, styles[1:]))


def test_registered_adamw_differs_from_adam_in_the_demo():
    """The registered ``adamw`` (weight decay 1e-4) equalled ``adam`` to three decimals in the
    demo's table and hid its curve; its decay is now large enough to show."""
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the 'demo' extra)")
    import arrayopt as ao
    from arrayopt.demo import data, threads, train

    digits = data.load(seed=0, dtype=np.float32)
    sizes = (digits.n_features,) + model.SIZES[1:-1] + (digits.n_features,)
    params0 = model.init_params(np.random.default_rng(0), sizes, dtype=np.float32)
    final = {}
    with threads.limit(1):  # as the demo runs (a small model: idle threads only slow the steps)
        for name in ("adam", "adamw"):
            r = train.train(name, ao.registry.make(name), params0, digits.train, digits.test,
                            epochs=1, batch_size=32, seed=0)
            final[name] = r.final_train_loss
    assert abs(final["adamw"] - final["adam"]) >= 1e-3, final


def test_backprop_statistics_are_the_layer_input_and_output_gradient_means():
    rng = np.random.default_rng(3)
    params = model.init_params(rng, (7, 6, 3, 6, 7), dtype=np.float64)
    x = rng.uniform(0.0, 1.0, size=(5, 7))
    value, grads, stats = model.loss_grads_and_stats(params, x)
    want_value, want_grads = model.loss_and_grads(params, x)
    assert value == want_value and all(np.array_equal(grads[k], want_grads[k]) for k in params)
    _, acts = model.forward(params, x)
    assert sorted(stats) == ["W1", "W2", "W3", "W4"]
    for i in range(1, 5):
        s = stats[f"W{i}"]
        assert s["bias"] == f"b{i}"
        np.testing.assert_allclose(s["a"], np.append(acts[i - 1].mean(0), 1.0), rtol=1e-14)
        # the bias gradient is the sum over the batch of the output gradients: B·ḡ
        np.testing.assert_allclose(s["g"] * x.shape[0], grads[f"b{i}"], rtol=1e-12)


def test_the_main_job_trains_the_eva_rows_with_the_mlps_statistics():
    import arrayopt as ao
    from arrayopt.demo import cli, report, train

    assert {"eva", "eva_f", "eva_s"} <= set(cli.parse_args([]).optimizers)  # rows of the default table
    rng = np.random.default_rng(0)
    params0 = model.init_params(rng, (8, 6, 3, 6, 8))
    digits = _Digits()
    results = [train.train(name, ao.registry.make(name), params0, digits.train, digits.test, epochs=3,
                           batch_size=8, seed=0) for name in ("eva", "eva_f", "eva_s")]
    for r in results:
        assert not r.diverged and r.steps == 18 and r.final_train_loss < r.initial_train_loss, r.name
    assert [row[0] for row in report.rows(results)] == ["eva", "eva_f", "eva_s"]
    # Eva keeps ā and ḡ per layer beside the momentum, Eva-f ā only
    assert results[0].state_bytes > results[1].state_bytes


def test_the_eva_rows_precondition_the_mlps_weights():
    """The registered Eva reads the MLP's (fan_in, fan_out) weights with their statistics: its step
    is not the SGD-momentum step it takes without them."""
    import arrayopt as ao
    from arrayopt.demo import train

    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, size=(64, 8)).astype(np.float32)
    params = model.init_params(rng, (8, 6, 3, 6, 8))
    opt = ao.registry.make("eva")
    _, grads, kw = train._loss_and_grads(opt, params, x)
    assert set(kw["stats"]) == {"W1", "W2", "W3", "W4"}
    with_stats, state = opt.step({k: v.copy() for k, v in params.items()}, grads, opt.init(params), **kw)
    assert state["kv_updates"] == [1 if k.startswith("W") else 0 for k in params]
    without, _ = opt.step({k: v.copy() for k, v in params.items()}, grads, opt.init(params))
    d_with, d_without = with_stats["W1"] - params["W1"], without["W1"] - params["W1"]
    assert np.abs(d_with).max() > 0 and not np.allclose(d_with, d_without, rtol=1e-2, atol=0)
    assert train._loss_and_grads(ao.registry.make("eva_s"), params, x)[2] == {}


@pytest.mark.slow  # 2 x 440 steps of the main job's MLP
def test_the_registered_eva_f_rate_beats_the_former_one_on_the_main_job():
    """Eva-f's registered rate was 0.1, where the KL clip fixes the step size and Eva-f ended ~28
    nats above the floor; the rate of the main job's grid trains further."""
    import arrayopt as ao
    from arrayopt.demo import data, train

    digits = data.load(0)
    params0 = model.init_params(np.random.default_rng(0))
    for name in ("eva_f",):
        runs = [train.train(name, opt, params0, digits.train, digits.test, epochs=10, batch_size=32, seed=0,
                            warmup=False)
                for opt in (ao.registry.make(name), ao.registry.make(name, learning_rate=0.1))]
        assert runs[0].final_train_loss < runs[1].final_train_loss - 0.5, name
