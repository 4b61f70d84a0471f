"""The torch adapter behaves as a torch.optim user expects: None gradients, torch's group names,
lr, ``optimizer.state``, sparse gradients, checks before writes, aliases, Eva statistics."""

from __future__ import annotations

import pytest

import arrayopt as ao

torch = pytest.importorskip("torch", reason="the torch adapter needs torch")
from arrayopt.interop.torch import KVCapture, Optimizer  # noqa: E402


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)]


def _set_grads(params, t, present):
    g = torch.Generator().manual_seed(100 + t)
    for p, keep in zip(params, present):
        p.grad = (0.7 * p.detach() + torch.randn(p.shape, generator=g, dtype=p.dtype)) if keep else None


TORCH_EQUIVALENTS = {
    "Adam": (lambda: ao.adam(0.01, weight_decay=1e-2), dict(lr=0.01, weight_decay=1e-2)),
    "AdamW": (lambda: ao.adamw(0.01, weight_decay=0.1), dict(lr=0.01, weight_decay=0.1)),
    "SGD": (lambda: ao.sgd(0.05, momentum=0.9, weight_decay=1e-3), dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "Adagrad": (lambda: ao.adagrad(0.1, weight_decay=1e-3), dict(lr=0.1, weight_decay=1e-3)),
}


@pytest.mark.parametrize("name", list(TORCH_EQUIVALENTS))
def test_none_gradients_leave_param_and_state_untouched_as_torch_optim(name):
    make, kw = TORCH_EQUIVALENTS[name]
    ours, theirs = _params(), _params()
    opt1 = Optimizer(ours, make())
    opt2 = getattr(torch.optim, name)(theirs, **kw, foreach=False)
    pattern = torch.Generator().manual_seed(7)
    for t in range(50):
        present = (torch.rand(3, generator=pattern) < 0.6).tolist()
        _set_grads(ours, t, present)
        _set_grads(theirs, t, present)
        opt1.step()
        opt2.step()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=f"{name} param {i}")
        s1, s2 = opt1.state[a], opt2.state[b]
        for key in s2:
            torch.testing.assert_close(s1[key].to(torch.float64), s2[key].to(torch.float64), rtol=1e-12, atol=1e-13,
                                       msg=f"{name} param {i} state {key}")
    assert len(opt1._groups) == 1 and opt1._groups[0].state is not None  # one persistent state


@pytest.mark.parametrize("make", [lambda: ao.sonew(0.01, band=1), lambda: ao.shampoo(0.01, block_size=4),
                                  lambda: ao.sketchy(0.01, rank=2),
                                  lambda: ao.chain(ao.clip_by_global_norm(1.0), ao.adam(0.01))],
                         ids=["sonew", "shampoo", "sketchy", "chain"])
def test_second_order_optimizers_leave_a_param_without_gradient_and_its_state_entries_untouched(make):
    params = [p.detach().float().requires_grad_() for p in _params()]
    opt = Optimizer(params, make())
    _set_grads(params, 0, [True, True, True])
    opt.step()
    before_p = params[1].detach().clone()
    before_s = {k: v.clone() for k, v in opt.state[params[1]].items() if isinstance(v, torch.Tensor)}
    for t in range(1, 4):
        _set_grads(params, t, [True, False, True])
        opt.step()
    assert torch.equal(params[1], before_p)
    after = opt.state[params[1]]
    assert before_s and all(torch.equal(after[k], v) for k, v in before_s.items())
    assert [float(opt.state[p]["step"]) for p in params] == [4.0, 1.0, 4.0]
    _set_grads(params, 9, [True, True, True])
    opt.step()  # steps of different counts run apart, then the state is whole again
    assert [float(opt.state[p]["step"]) for p in params] == [5.0, 2.0, 5.0]
    assert not torch.equal(params[1], before_p)


@pytest.mark.parametrize("sched", ["StepLR", "CosineAnnealingLR"])
def test_torch_style_groups_and_schedulers_match_torch_adam(sched):
    ours, theirs = _params(), _params()

    def groups(ps):
        return [{"params": ps[:2], "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "lr": 3e-4,
                 "amsgrad": False, "foreach": False},
                {"params": ps[2:], "lr": 1e-3, "weight_decay": 0.0}]

    opt1 = Optimizer(groups(ours), ao.adam())
    opt2 = torch.optim.Adam(groups(theirs))
    make = {"StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
            "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30)}[sched]
    s1, s2 = make(opt1), make(opt2)
    assert opt1.param_groups[0]["betas"] == (0.9, 0.95)
    for t in range(40):
        _set_grads(ours, t, [True] * 3)
        _set_grads(theirs, t, [True] * 3)
        opt1.step()
        opt2.step()
        s1.step()
        s2.step()
        assert [g["lr"] for g in opt1.param_groups] == [g["lr"] for g in opt2.param_groups]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("key,value", [("amsgrad", True), ("maximize", True), ("fused", True), ("foreach", True),
                                       ("capturable", True), ("differentiable", True)])
def test_torch_only_options_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{key}'\]: torch's {key}={value} has no arrayopt"):
        Optimizer([{"params": _params(), key: value}], ao.adam())


def test_betas_on_an_optimizer_without_b1_b2_and_both_spellings_are_refused():
    with pytest.raises(ValueError, match=r"\['betas'\]: the optimizer has no b1, b2"):
        Optimizer([{"params": _params(), "betas": (0.9, 0.99)}], ao.sgd(0.1))
    with pytest.raises(ValueError, match="sets both 'betas' and 'b1'"):
        Optimizer([{"params": _params(), "betas": (0.9, 0.99), "b1": 0.8}], ao.adam())
    opt = Optimizer([{"params": _params(), "betas": (0.9, 0.99)}], ao.adam())
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    _set_grads(opt.param_groups[0]["params"], 0, [True] * 3)
    with pytest.raises(ValueError, match="b2"):
        opt.step()


def test_state_shows_torch_names_and_matches_torch():
    for name, (make, kw), keys in [("Adam", TORCH_EQUIVALENTS["Adam"], {"exp_avg", "exp_avg_sq", "step"}),
                                   ("SGD", TORCH_EQUIVALENTS["SGD"], {"momentum_buffer", "step"}),
                                   ("Adagrad", TORCH_EQUIVALENTS["Adagrad"], {"sum", "step"})]:
        ours, theirs = _params(), _params()
        opt1, opt2 = Optimizer(ours, make()), getattr(torch.optim, name)(theirs, **kw)
        assert opt1.state[ours[0]] == {}
        for t in range(3):
            _set_grads(ours, t, [True] * 3)
            _set_grads(theirs, t, [True] * 3)
            opt1.step()
            opt2.step()
        assert set(opt1.state[ours[0]]) == keys
        assert len(opt1.state) == 3 and set(map(id, opt1.state)) == set(map(id, ours))
        for key in keys - {"step"}:
            torch.testing.assert_close(opt1.state[ours[0]][key], opt2.state[theirs[0]][key], rtol=1e-13, atol=1e-15)
        assert float(opt1.state[ours[0]]["step"]) == 3.0


def test_sparse_gradient_is_refused_before_anything_is_written():
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    lin = torch.nn.Linear(3, 1).double()
    opt = Optimizer([{"params": lin.parameters()}, {"params": emb.parameters()}], ao.adam(0.1))
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in [*lin.parameters(), *emb.parameters()]]
    with pytest.raises(TypeError, match=r"grads leaf 0: a torch.sparse_coo gradient.*sparse gradients are not"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, [*lin.parameters(), *emb.parameters()]))
    assert all(r.state is None for r in opt._groups)


def test_a_bad_lr_in_a_later_group_raises_before_the_first_group_steps():
    params = _params()
    opt = Optimizer([{"params": params[:2]}, {"params": params[2:]}], ao.adam(0.01))
    _set_grads(params, 0, [True] * 3)
    opt.param_groups[1]["lr"] = float("nan")
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]: expected a finite float >= 0, got nan"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(r.state is None for r in opt._groups)
    opt.param_groups[1]["lr"] = 0.01
    opt.param_groups[1]["eps"] = -1.0  # an override is validated before any group writes
    with pytest.raises(ValueError, match="eps"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_zero_stride_params_and_aliases_are_refused_by_name():
    with pytest.raises(ValueError, match=r"params 0 \(group 0\): has a zero stride"):
        Optimizer([torch.zeros(1, dtype=torch.float64).expand(4)], ao.adam())
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    q = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    for make in (ao.adam, lambda: ao.sonew(0.01), lambda: ao.shampoo(0.01)):
        with pytest.raises(ValueError, match=r"params 0 \(group 0\) and 2 \(group 0\): the same tensor"):
            Optimizer([p, q, p], make())
        with pytest.raises(ValueError, match=r"params 0 \(group 0\) and 0 \(group 1\): the same tensor"):
            Optimizer([{"params": [p]}, {"params": [p, q]}], make())
        with pytest.raises(ValueError, match=r"params 0 \(group 0\) and 1 \(group 0\): views of overlapping memory"):
            Optimizer([p, p.detach()], make())
        opt = Optimizer([p], make())
        with pytest.raises(ValueError, match=r"views of overlapping memory"):
            opt.add_param_group({"params": [p.detach()[1:]]})
        assert len(opt.param_groups) == 1
    flat = torch.zeros(10, dtype=torch.float64)
    Optimizer([flat[:4], flat[4:]], ao.adam())  # disjoint views of one buffer are fine


# ---------------------------------------------------------------- Eva

def _eva_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def test_eva_without_statistics_raises_at_the_first_step_and_eva_s_needs_none():
    model = _eva_model()
    for variant in ("eva", "eva_f"):
        opt = Optimizer(model.parameters(), ao.eva(0.1, variant=variant))
        model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
        with pytest.raises(TypeError, match="needs per-layer statistics; pass stats=KVCapture"):
            opt.step()
    opt = Optimizer(model.parameters(), ao.eva(0.1, variant="eva_s"))
    opt.step()


def test_eva_with_a_kvcapture_equals_eva_stepped_with_the_capture_directly():
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m1, m2 = _eva_model(), _eva_model()
    opt1 = Optimizer(m1.named_parameters(), ao.eva(0.1), stats=KVCapture(m1))
    cap2 = KVCapture(m2)
    params = dict(m2.named_parameters())
    eva = ao.eva(0.1)
    state = eva.init({k: p.detach() for k, p in params.items()})
    for _ in range(4):
        opt1.zero_grad()
        m1(x).square().mean().backward()
        opt1.step()
        for p in params.values():
            p.grad = None
        m2(x).square().mean().backward()
        with torch.no_grad():
            _, state = eva.step({k: p.detach() for k, p in params.items()},
                                {k: p.grad for k, p in params.items()}, state, stats=cap2.stats())
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert [int(opt1.state[p]["kv_updates"]) for p in m1.parameters()] == [4, 0, 4, 0]


def test_eva_per_microbatch_folds_each_micro_batch_into_the_running_average():
    from arrayopt.eva.math import kv_linear

    model = _eva_model()
    eva = ao.eva(0.1, stat_decay=0.3)
    opt = Optimizer(model.parameters(), eva, stats=KVCapture(model, accumulate="per_microbatch"))
    gen = torch.Generator().manual_seed(5)
    want = None
    for step in range(2):
        opt.zero_grad()
        for _ in range(3):
            x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
            a = torch.cat([kv_linear(x), torch.ones(1, dtype=torch.float64)])
            want = a if want is None else 0.3 * want + 0.7 * a
            (model(x).square().mean() / 3).backward()
        opt.step()
        torch.testing.assert_close(opt.state[model[0].weight]["kv_a"], want, rtol=1e-13, atol=1e-15)
