r"""The Kronecker vectors of a torch model's ``Linear`` and ``Conv2d`` layers, for ``ao.eva``.

A forward hook reads each layer's input (``ā``, :func:`arrayopt.linalg.kv_linear` /
:func:`~arrayopt.linalg.kv_conv2d`) and registers a tensor hook on the layer's output,
which receives the loss gradient w.r.t. that output (``ḡ``, :func:`~arrayopt.linalg.kv_grad`).
A tensor hook, not a module backward hook: full backward hooks fail when an in-place
activation (``ReLU(inplace=True)``) follows the layer, while a hook registered on the
output before the in-place op receives the gradient w.r.t. the layer's own output. The
hooks read and return nothing else: ``.grad`` is never touched, and ``torch.autograd.grad``
works as well as ``backward``.

Gradient accumulation, ``accumulate=``:

- ``"pool"`` (default): between two :meth:`KVCapture.stats` calls, every call of a layer
  (weight sharing: a layer called twice in one forward) and every backward pass (micro-batches)
  adds its rows to one pool, and the vectors are the means over the pooled rows. This is the
  layer seen as one call on the concatenated inputs, so ``k`` micro-batches whose losses are
  each divided by ``k`` give the statistics of the whole batch, and Eva's running average
  takes one update per step.
- ``"per_microbatch"``: each micro-batch (the calls of a layer up to its backward pass) is
  pooled apart, and :meth:`stats` gives a list of ``k`` vectors per entry (``"a": [ā_1, ...]``,
  ``"g": [ḡ_1, ...]``); ``arrayopt.interop.torch.Optimizer(..., stats=capture)`` folds them into
  Eva's running average as ``k`` successive updates. This is what the authors' reference code
  does (its hooks update the running average at every forward and backward pass); with
  ``kv_batch=16`` (the first 16 rows of each micro-batch) it reproduces the reference's
  statistics.

Layers run without autograd recording (``torch.no_grad()``, evaluation) are not counted.

``ḡ`` is the gradient of the loss autograd differentiates: with AMP loss scaling pass
``stats(loss_scale=scaler.get_scale())`` to undo it (and unscale the gradients,
``scaler.unscale_``, before the step).

>>> import torch, arrayopt as ao
>>> from arrayopt.interop.torch import KVCapture
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 2))
>>> capture = KVCapture(model)
>>> params = dict(model.named_parameters())
>>> opt = ao.eva(learning_rate=0.1)
>>> state = opt.init(params)
>>> loss = model(torch.randn(16, 4)).square().mean()
>>> loss.backward()
>>> grads = {k: p.grad for k, p in params.items()}
>>> with torch.no_grad():
...     params, state = opt.step(params, grads, state, stats=capture.stats())
>>> state["count"], state["kv_updates"]
(1, [1, 0, 1, 0])
"""

from __future__ import annotations

import math
import threading

import torch

from ..eva.math import kv_conv2d, kv_grad, kv_linear

__all__ = ["KVCapture"]


class _Pool:
    """Row-weighted sums of one layer's input and output-gradient means."""

    def __init__(self):
        self.a_sum = self.g_sum = None
        self.a_rows = self.g_rows = 0

    def add_a(self, a, rows):
        self.a_sum = a * rows if self.a_sum is None else self.a_sum + a * rows
        self.a_rows += rows

    def add_g(self, g, rows):
        self.g_sum = g * rows if self.g_sum is None else self.g_sum + g * rows
        self.g_rows += rows


def _at_least_f32(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _conv_geometry(name, module):
    if module.groups != 1:
        raise ValueError(f"model: Conv2d {name!r} has groups={module.groups}; Eva supports groups=1 only")
    if tuple(module.dilation) != (1, 1):
        raise ValueError(f"model: Conv2d {name!r} has dilation={module.dilation}; Eva supports dilation 1 only")
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ValueError(f"model: Conv2d {name!r} has padding {module.padding!r} ({module.padding_mode}); "
                         f"Eva supports explicit zero padding only")
    return tuple(module.kernel_size), tuple(module.stride), tuple(module.padding)


class KVCapture:
    """Hooks on every ``torch.nn.Linear`` and ``torch.nn.Conv2d`` of ``model``.

    :meth:`stats` returns ``{"<layer>.weight": {"a": ā, "g": ḡ, "bias": "<layer>.bias"}}``, keyed
    like ``dict(model.named_parameters())`` (``prefix`` is put before each name), and clears the
    pools. ``kv_batch``: use only the first that many rows (along axis 0) of each input and
    output gradient, as the reference code does with 16. ``accumulate``: ``"pool"`` or
    ``"per_microbatch"`` (module docstring). :meth:`tensor` gives the param a key names;
    :meth:`remove` takes the hooks off.
    """

    def __init__(self, model, *, kv_batch=None, prefix="", accumulate="pool"):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if kv_batch is not None and (isinstance(kv_batch, bool) or not isinstance(kv_batch, int) or kv_batch < 1):
            raise ValueError(f"kv_batch: expected None or an int >= 1, got {kv_batch!r}")
        if accumulate not in ("pool", "per_microbatch"):
            raise ValueError(f"accumulate: expected 'pool' or 'per_microbatch', got {accumulate!r}")
        self.kv_batch = kv_batch
        self.accumulate = accumulate
        self._tensors = {}  # key -> the param it names
        self._lock = threading.Lock()
        self._layers = {}  # module -> (weight key, bias key or None, conv geometry or None)
        self._pools = {}
        self._handles = []
        for name, module in model.named_modules():
            if type(module) not in (torch.nn.Linear, torch.nn.Conv2d):
                continue
            geometry = _conv_geometry(name, module) if isinstance(module, torch.nn.Conv2d) else None
            key = f"{prefix}{name}."
            bias = key + "bias" if module.bias is not None else None
            self._layers[module] = (key + "weight", bias, geometry)
            self._tensors[key + "weight"] = module.weight
            if bias is not None:
                self._tensors[bias] = module.bias
            self._handles.append(module.register_forward_hook(self._forward_hook))
        if not self._layers:
            raise ValueError("model: has no torch.nn.Linear or torch.nn.Conv2d layer to capture")

    def _rows(self, t):
        return t if self.kv_batch is None else t[: self.kv_batch]

    def _forward_hook(self, module, inputs, output):
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        weight_key, bias_key, geometry = self._layers[module]
        with torch.no_grad():
            x = _at_least_f32(self._rows(inputs[0].detach()))
            if geometry is None:
                a, rows = kv_linear(x), math.prod(x.shape[:-1])
            else:
                a = kv_conv2d(x, *geometry)
                rows = int(x.shape[0]) * math.prod(output.shape[-2:])
        with self._lock:
            pools = self._pools.setdefault(module, [_Pool()])
            if self.accumulate == "per_microbatch" and pools[-1].g_sum is not None:
                pools.append(_Pool())  # a forward after this layer's backward: the next micro-batch
            pool = pools[-1]
            pool.add_a(a, rows)
        axes = tuple(range(output.ndim - 1)) if geometry is None else (0, 2, 3)

        def on_output_grad(grad):
            with torch.no_grad():
                dy = _at_least_f32(self._rows(grad.detach()))
                g = kv_grad(dy, axes)
                n = math.prod(dy.shape) // int(dy.shape[-1 if geometry is None else 1])
            with self._lock:
                if self.accumulate == "pool":  # the pool of the current stats() period
                    self._pools.setdefault(module, [_Pool()])[-1].add_g(g, n)
                else:  # the micro-batch of this forward
                    pool.add_g(g, n)
            # returning None leaves the gradient as it is

        output.register_hook(on_output_grad)

    def stats(self, loss_scale=None, *, clear=True):
        """The statistics of the calls since the last ``stats()``; ``ḡ`` divided by ``loss_scale``."""
        if loss_scale is not None:
            loss_scale = float(loss_scale)
            if not math.isfinite(loss_scale) or loss_scale <= 0:
                raise ValueError(f"loss_scale: must be finite and > 0, got {loss_scale}")
        with self._lock:
            pools = self._pools
            if clear:
                self._pools = {}
        out = {}
        for module, mpools in pools.items():
            weight_key, bias_key, _ = self._layers[module]
            a_list, g_list = [], []
            for pool in mpools:
                if pool.a_sum is None:
                    continue
                a = pool.a_sum / pool.a_rows
                if bias_key is not None:
                    a = torch.cat([a, torch.ones(1, dtype=a.dtype, device=a.device)])
                a_list.append(a)
                if pool.g_sum is not None:
                    g = pool.g_sum / pool.g_rows
                    g_list.append(g / loss_scale if loss_scale is not None else g)
            if not a_list:
                continue
            if self.accumulate == "pool":
                entry = {"a": a_list[0]}
                if g_list:
                    entry["g"] = g_list[0]
            else:
                entry = {"a": a_list, "g": g_list}
            if bias_key is not None:
                entry["bias"] = bias_key
            out[weight_key] = entry
        return out

    def tensor(self, key):
        """The param a key of :meth:`stats` names (``"<layer>.weight"`` or ``"<layer>.bias"``)."""
        return self._tensors[key]

    def clear(self):
        """Drop what the hooks have gathered since the last :meth:`stats`."""
        with self._lock:
            self._pools = {}

    def remove(self):
        """Take the hooks off the model (output hooks already registered fire once more)."""
        for h in self._handles:
            h.remove()
        self._handles = []
