"""Eva through ``arrayopt.interop.torch.KVCapture``: capture semantics and end-to-end runs (V10).

The end-to-end oracle is written here in float64 NumPy from the math of
``docs/eva.md`` (E1)–(E8): explicit layers, output gradients from
``torch.autograd.grad`` of a float64 copy of the model, explicit patch unfolding, the
Sherman–Morrison step, KL clipping and the SGD-momentum step; it shares no code with
``ao.eva`` or ``KVCapture``.
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayopt as ao

torch = pytest.importorskip("torch", reason="KVCapture is the torch adapter")
KVCapture = ao.interop.torch.KVCapture
F = torch.nn.functional



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # models of a few hundred weights: torch's thread pool only adds contention on a shared machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


LR, MOMENTUM, WD, DAMPING, KAPPA, NEW_WEIGHT, KV_BATCH, STEPS = 0.05, 0.9, 5e-4, 0.03, 1e-3, 0.95, 16, 20


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, stride=1, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))


def _data(kind, step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn((24, 6) if kind == "mlp" else (24, 2, 8, 8), generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return x, y


# ---------------------------------------------------------------- the float64 oracle


def _oracle_kvs(model64, x, y):
    """Per weighted layer: (name, input a-bar, output g-bar, has_bias) and the loss gradients, float64."""
    acts, outs = [], []
    h = x
    for layer in model64:
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            acts.append((layer, h))
            h = layer(h)
            outs.append(h)
        else:
            h = layer(h)
    loss = F.cross_entropy(h, y)
    params = list(model64.parameters())
    grads = torch.autograd.grad(loss, params + outs)
    pgrads, dys = grads[:len(params)], grads[len(params):]
    kvs = []
    for (layer, inp), dy in zip(acts, dys):
        xi, dyi = inp[:KV_BATCH].detach().numpy(), dy[:KV_BATCH].numpy()
        if isinstance(layer, torch.nn.Conv2d):
            patches = F.unfold(torch.tensor(xi), layer.kernel_size, padding=layer.padding, stride=layer.stride)
            a = patches.numpy().mean(axis=(0, 2))
            g = dyi.mean(axis=(0, 2, 3))
        else:
            a, g = xi.mean(axis=0), dyi.mean(axis=0)
        kvs.append((layer, a, g))
    return kvs, {id(p): gr.numpy() for p, gr in zip(params, pgrads)}


def _oracle_run(model, kind):
    model64 = _copy(model).double()
    ema, buf = {}, {}
    for step in range(STEPS):
        x, y = _data(kind, step)
        kvs, grads = _oracle_kvs(model64, x.double(), y)
        dirs = {id(p): grads[id(p)].copy() for p in model64.parameters()}
        pre, inner_sum = [], 0.0
        for layer, a, g in kvs:
            has_bias = layer.bias is not None
            a = np.append(a, 1.0) if has_bias else a
            key = id(layer)
            if key in ema:  # the reference's running average: weight NEW_WEIGHT on the new vector
                a = (1 - NEW_WEIGHT) * ema[key][0] + NEW_WEIGHT * a
                g = (1 - NEW_WEIGHT) * ema[key][1] + NEW_WEIGHT * g
            ema[key] = (a, g)
            d_out = layer.weight.shape[0]
            G = grads[id(layer.weight)].reshape(d_out, -1)
            if has_bias:
                G = np.concatenate([G, grads[id(layer.bias)][:, None]], axis=1)
            beta = (g @ G @ a) / (DAMPING + (a @ a) * (g @ g))
            P = (G - beta * np.outer(g, a)) / DAMPING
            inner_sum += np.sum(P * G)
            pre.append((layer, P))
        nu = min(1.0, np.sqrt(KAPPA / (LR**2 * inner_sum)))
        for layer, P in pre:
            w = layer.weight
            dirs[id(w)] = nu * P[:, :w[0].numel()].reshape(w.shape)
            if layer.bias is not None:
                dirs[id(layer.bias)] = nu * P[:, -1]
        with torch.no_grad():
            for p in model64.parameters():
                d = dirs[id(p)] + WD * p.numpy()
                buf[id(p)] = MOMENTUM * buf.get(id(p), 0.0) + d
                p -= LR * torch.tensor(buf[id(p)])
    return [p.detach().numpy() for p in model64.parameters()]


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _arrayopt_run(model, kind):
    model = _copy(model)
    capture = KVCapture(model, kv_batch=KV_BATCH)
    opt = ao.eva(LR, momentum=MOMENTUM, damping=DAMPING, kl_clip=KAPPA, stat_decay=1 - NEW_WEIGHT,
                 weight_decay=WD)
    params = dict(model.named_parameters())
    state = opt.init(params)
    for step in range(STEPS):
        x, y = _data(kind, step)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {k: p.grad for k, p in params.items()}
        with torch.no_grad():
            params, state = opt.step(params, grads, state, stats=capture.stats())
    assert state["count"] == STEPS and all(n == STEPS for n in state["kv_updates"][::2] if n)
    return [p.detach().numpy() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_v10_twenty_steps_match_the_float64_oracle(kind):
    model = _mlp() if kind == "mlp" else _cnn()
    start = [p.detach().numpy().copy() for p in model.parameters()]
    want = _oracle_run(model, kind)
    got = _arrayopt_run(model, kind)
    for p0, w, g in zip(start, want, got):
        assert np.max(np.abs(w - p0)) > 1e-3  # the run moved the params
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- capture semantics


def _stats_of(model, x, capture=None, loss_scale=None, scale=1.0):
    capture = capture or KVCapture(model)
    (model(x).square().mean() * scale).backward()
    return capture.stats(loss_scale=loss_scale)


def _assert_stats_close(s1, s2, rtol=1e-6):
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k].keys() == s2[k].keys(), k
        for name in ("a", "g"):
            np.testing.assert_allclose(s1[k][name].numpy(), s2[k][name].numpy(), rtol=rtol, atol=1e-9,
                                       err_msg=f"{k} {name}")
        assert s1[k].get("bias") == s2[k].get("bias")


def test_in_place_relu_gives_the_statistics_of_the_out_of_place_model():
    x = torch.randn(8, 6)
    plain = _mlp()
    inplace = _mlp()
    inplace[1] = torch.nn.ReLU(inplace=True)
    _assert_stats_close(_stats_of(plain, x), _stats_of(inplace, x))


def test_a_layer_called_twice_pools_its_rows_like_one_call_on_the_concatenation():
    torch.manual_seed(1)
    lin = torch.nn.Linear(5, 4)
    x1, x2 = torch.randn(6, 5), torch.randn(10, 5)
    cap = KVCapture(lin)
    (lin(x1).square().sum() + lin(x2).square().sum()).backward()
    twice = cap.stats()
    once = _stats_of_sum(lin, torch.cat([x1, x2]), cap)
    _assert_stats_close(twice, once)
    want_a = torch.cat([x1, x2]).mean(0)
    np.testing.assert_allclose(twice[".weight"]["a"][:-1].numpy(), want_a.numpy(), rtol=1e-6)


def _stats_of_sum(layer, x, capture):
    layer(x).square().sum().backward()
    return capture.stats()


def test_gradient_accumulation_gives_the_statistics_of_the_whole_batch():
    model = _mlp()
    x = torch.randn(16, 6)
    cap = KVCapture(model)
    for part in (x[:8], x[8:]):  # two micro-batches, each loss divided by 2
        (model(part).square().mean() / 2).backward()
    accumulated = cap.stats()
    _assert_stats_close(accumulated, _stats_of(model, x, cap))


def test_loss_scale_is_undone_and_grad_is_never_touched():
    model = _mlp()
    x = torch.randn(8, 6)
    cap = KVCapture(model)
    plain = _stats_of(model, x, cap)
    grads_plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scaled = _stats_of(model, x, cap, loss_scale=1024.0, scale=1024.0)
    _assert_stats_close(plain, scaled)
    # the hooks change no gradient: the same .grad as a model without hooks
    bare = _mlp()
    bare(x).square().mean().backward()
    model.zero_grad()
    model(x).square().mean().backward()
    for p, q, r in zip(model.parameters(), bare.parameters(), grads_plain):
        assert torch.equal(p.grad, q.grad) and torch.equal(p.grad, r)
    # torch.autograd.grad: statistics without any .grad
    model.zero_grad(set_to_none=True)
    torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    _assert_stats_close(cap.stats(), plain)


def test_no_grad_calls_are_not_counted_and_remove_takes_the_hooks_off():
    model = _mlp()
    cap = KVCapture(model)
    with torch.no_grad():
        model(torch.randn(4, 6))
    assert cap.stats() == {}
    model(torch.randn(4, 6)).sum().backward()
    assert set(cap.stats()) == {"0.weight", "2.weight"}
    cap.remove()
    model(torch.randn(4, 6)).sum().backward()
    assert cap.stats() == {}


def test_unsupported_layers_and_options_raise_named_errors():
    with pytest.raises(ValueError, match="groups=2"):
        KVCapture(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="dilation"):
        KVCapture(torch.nn.Conv2d(4, 4, 3, dilation=2))
    with pytest.raises(ValueError, match="padding 'same'"):
        KVCapture(torch.nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(ValueError, match="no torch.nn.Linear or torch.nn.Conv2d"):
        KVCapture(torch.nn.ReLU())
    with pytest.raises(ValueError, match="kv_batch"):
        KVCapture(torch.nn.Linear(2, 2), kv_batch=0)
    with pytest.raises(ValueError, match="loss_scale"):
        KVCapture(torch.nn.Linear(2, 2)).stats(loss_scale=0.0)
