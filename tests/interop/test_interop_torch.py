"""``arrayopt.interop.torch.Optimizer``: a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import io

import pytest

import arrayopt as ao

torch = pytest.importorskip("torch", reason="the torch adapter needs torch")
from arrayopt.interop.torch import Optimizer  # noqa: E402


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=g, dtype=dtype), torch.randn(32, 1, generator=g, dtype=dtype)


def _train(model, optimizer, scheduler, steps, x, y):
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        scheduler.step()


def _groups(model):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return weights, biases


# (arrayopt optimizer, torch.optim kwargs of the first group, overrides of the second group)
CASES = {
    "SGD": (lambda: ao.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
            dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), {"lr": 0.02, "weight_decay": 0.0}),
    "Adam": (lambda: ao.adam(0.01, weight_decay=1e-3), dict(lr=0.01, weight_decay=1e-3),
             {"lr": 0.03, "weight_decay": 0.0}),
    "AdamW": (lambda: ao.adamw(0.01, weight_decay=0.1), dict(lr=0.01, weight_decay=0.1), {"weight_decay": 0.0}),
    "Adagrad": (lambda: ao.adagrad(0.1, eps=1e-10), dict(lr=0.1, eps=1e-10), {"lr": 0.05, "eps": 1e-6}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_trajectory_equals_torch_optim_with_two_groups_and_steplr(name):
    make, torch_kw, second = CASES[name]
    x, y = _data()
    ours, theirs = _model(), _model()
    w1, b1 = _groups(ours)
    w2, b2 = _groups(theirs)
    opt1 = Optimizer([{"params": w1}, {"params": b1, **second}], make())
    opt2 = getattr(torch.optim, name)([{"params": w2}, {"params": b2, **second}], **torch_kw)
    assert [g["lr"] for g in opt1.param_groups] == [g["lr"] for g in opt2.param_groups]
    s1 = torch.optim.lr_scheduler.StepLR(opt1, step_size=10, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=10, gamma=0.5)
    _train(ours, opt1, s1, 50, x, y)
    _train(theirs, opt2, s2, 50, x, y)
    assert opt1.param_groups[0]["lr"] == opt2.param_groups[0]["lr"] == torch_kw["lr"] * 0.5 ** 5
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} {n}")


def test_a_changed_override_takes_effect_at_the_next_step():
    ours, theirs = _model(), _model()
    opt1 = Optimizer(ours.parameters(), ao.adamw(0.01, weight_decay=0.1))
    opt2 = torch.optim.AdamW(theirs.parameters(), lr=0.01, weight_decay=0.1)
    x, y = _data()
    for t in range(4):
        for m, o in ((ours, opt1), (theirs, opt2)):
            if t == 2:
                o.param_groups[0]["weight_decay"] = 0.0
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_with_an_arrayopt_schedule_lr_shows_the_rate_in_effect_and_setting_it_scales_the_schedule():
    """lr is the rate the next step uses (not a multiplier); StepLR scales the arrayopt schedule."""
    model = _model()
    sched = ao.schedules.cosine_decay(0.1, 20)
    opt = Optimizer(model.parameters(), ao.sgd(sched))
    steplr = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref = _model()
    opt_ref = Optimizer(ref.parameters(), ao.sgd(0.1))
    x, y = _data()
    for t in range(6):
        want = 0.5 ** (t // 2) * float(sched(t))
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-14)
        opt_ref.param_groups[0]["lr"] = want
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
        steplr.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # a group dict's lr is the rate of the first step too
    opt2 = Optimizer([{"params": list(_model().parameters()), "lr": 0.05}], ao.sgd(sched))
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05, rel=1e-15)
    warm = Optimizer(_model().parameters(), ao.sgd(ao.schedules.linear_warmup(0.1, 5)))
    assert warm.param_groups[0]["lr"] == 0.0
    warm.param_groups[0]["lr"] = 0.1
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]: set to 0.1 while the group's arrayopt "
                                         r"schedule is at 0"):
        warm.step()


@pytest.mark.parametrize("make", [lambda: ao.adam(0.01), lambda: ao.sonew(0.01, band=1),
                                  lambda: ao.chain(ao.clip_by_global_norm(1.0), ao.shampoo(0.01, block_size=4))],
                         ids=["adam", "sonew", "chain-shampoo"])
def test_state_dict_through_torch_save_weights_only_continues_bit_identically(make):
    x, y = _data(torch.float32)
    model = _model(dtype=torch.float32)
    opt = Optimizer(model.named_parameters(), make())
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    _train(model, opt, sched, 5, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    _train(model, opt, sched, 4, x, y)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = _model(seed=5, dtype=torch.float32)
    model2.load_state_dict(ckpt["model"])
    opt2 = Optimizer(model2.named_parameters(), make())
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 3, 0.5)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    _train(model2, opt2, sched2, 4, x, y)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_gradscaler_skips_the_step_with_an_inf_and_leaves_the_state_unchanged():
    x, y = _data(torch.float32)
    model = _model(dtype=torch.float32)
    opt = Optimizer(model.parameters(), ao.adam(0.01))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for t in range(3):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if t == 2:
            next(model.parameters()).grad[0, 0] = float("inf")
            before_p = [p.detach().clone() for p in model.parameters()]
            before_s = opt.state_dict()["arrayopt"]
        scaler.step(opt)
        scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before_p, model.parameters()))
    after_s = opt.state_dict()["arrayopt"]
    assert after_s[0]["tree"] == before_s[0]["tree"] and after_s[0]["counts"] == before_s[0]["counts"]
    assert all(torch.equal(after_s[0]["arrays"][k], v) for k, v in before_s[0]["arrays"].items())
    assert scaler.get_scale() == 2.0 ** 9


def test_params_without_grad_are_skipped():
    model = _model()
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    opt = Optimizer(model.parameters(), ao.adam(0.01))
    x, y = _data()
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert torch.equal(model[0].bias, frozen)
    assert opt.state[model[0].bias]["step"] == 0 and opt.state[model[0].weight]["step"] == 2


def test_closure_and_bad_input_errors():
    model = _model()
    opt = Optimizer(model.parameters(), ao.sgd(0.1))
    x, y = _data()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) > 0
    with pytest.raises(TypeError, match="opt: expected an arrayopt optimizer"):
        Optimizer(model.parameters(), torch.optim.SGD)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['momentum'\]: not a hyperparameter of Adam"):
        Optimizer([{"params": list(model.parameters()), "momentum": 0.9}], ao.adamw())
    with pytest.raises(ValueError, match="weight_decay: must be >= 0"):
        Optimizer([{"params": list(model.parameters()), "weight_decay": -1.0}], ao.adamw())
    with pytest.raises(TypeError, match=r"params 0 \(group 0\): dtype torch.int64 is not a real floating dtype"):
        Optimizer([torch.zeros(3, dtype=torch.int64)], ao.adam())
    named = _model()
    opt_named = Optimizer(named.named_parameters(), ao.adam(0.1))
    torch.nn.functional.mse_loss(named(x), y).backward()
    named[2].bias.grad[0] = float("nan")
    before = [p.detach().clone() for p in named.parameters()]
    with pytest.raises(ValueError, match=r"grads leaf \['2.bias'\]: contains NaN or Inf"):
        opt_named.step()
    assert all(torch.equal(a, b) for a, b in zip(before, named.parameters()))
    # two groups, the second with the bad gradient: the first group does not step either
    grouped = _model()
    w, b = _groups(grouped)
    opt_grouped = Optimizer([{"params": w}, {"params": b}], ao.adam(0.1))
    torch.nn.functional.mse_loss(grouped(x), y).backward()
    b[1].grad[0] = float("inf")
    before = [p.detach().clone() for p in grouped.parameters()]
    with pytest.raises(ValueError, match=r"grads leaf \['1'\]: contains NaN or Inf"):
        opt_grouped.step()
    assert all(torch.equal(a, b) for a, b in zip(before, grouped.parameters()))
    assert all(r.state is None or r.state["count"] == 0 for r in opt_grouped._groups)
    assert len(opt_grouped.state) == 0 or all(float(s["step"]) == 0 for s in opt_grouped.state.values())
    other = Optimizer(_model().parameters(), ao.sgd(0.1, momentum=0.9))
    other.zero_grad()
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"state": {}})


@pytest.mark.parametrize("make", [lambda: ao.sonew(0.02, band=1), lambda: ao.shampoo(0.02, block_size=8)],
                         ids=["sonew", "shampoo"])
def test_nn_module_trains_with_second_order_optimizers(make):
    x, y = _data(torch.float32)
    model = _model(dtype=torch.float32)
    opt = Optimizer(model.parameters(), make())
    start = float(torch.nn.functional.mse_loss(model(x), y).detach())
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * start


def test_importing_arrayopt_and_its_interop_package_imports_no_framework():
    import subprocess
    import sys

    code = ("import sys, arrayopt, arrayopt.interop; "
            "print(sorted(m for m in ('torch', 'jax', 'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cpu_tensors_reach_the_numba_kernel_in_place(monkeypatch):
    numba_cpu = next((b for b in ao.dispatch.backends() if b.name == "numba_cpu"), None)
    if numba_cpu is None:
        pytest.skip("the Numba backend is not available")
    seen = []
    run = numba_cpu.run

    def recording_run(op, leaves, *args, **kwargs):
        seen.append((op, [t.data_ptr() for t in leaves]))
        return run(op, leaves, *args, **kwargs)

    monkeypatch.setattr(numba_cpu, "run", recording_run)
    model = _model(dtype=torch.float32)
    pointers = [p.data_ptr() for p in model.parameters()]
    opt = Optimizer(model.parameters(), ao.adam(0.01))
    x, y = _data(torch.float32)
    torch.nn.functional.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert seen == [("adam", pointers)]  # the parameters' own memory, no copies
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
