"""First-order optimizers: SGD (momentum, Nesterov), Adam, AdamW, AdaGrad.

The math is that of ``torch.optim.SGD/Adam/AdamW/Adagrad`` (same eps placement,
bias correction and decoupled decay), written as pure array-API code. ``t`` is
the 1-based step number and ``η_t`` the learning rate (a float or a schedule
evaluated at ``t - 1``).

>>> import numpy as np, arrayopt as ao
>>> params = {"w": np.ones(3, dtype=np.float32)}
>>> opt = ao.adam(learning_rate=0.1)
>>> state = opt.init(params)
>>> params, state = opt.step(params, {"w": np.full(3, 0.5, np.float32)}, state)
>>> [round(float(x), 4) for x in params["w"]]
[0.9, 0.9, 0.9]
"""

from __future__ import annotations

import math

from . import _validate
from ._overflow import gradients_in_range
from .base import ElementwiseOptimizer

__all__ = ["sgd", "adam", "adamw", "adagrad", "SGD", "Adam", "AdaGrad"]


class SGD(ElementwiseOptimizer):
    r"""SGD with optional heavy-ball or Nesterov momentum and L2 weight decay.

    .. math::
        d_t = g_t + λ θ_{t-1};\quad
        b_t = μ b_{t-1} + d_t;\quad
        θ_t = θ_{t-1} - η_t\,(d_t + μ b_t \text{ if Nesterov else } b_t)

    With ``momentum=0`` there is no state and ``θ_t = θ_{t-1} - η_t d_t``.
    """

    name = "sgd"
    kernel_op = "sgd"

    def __init__(self, learning_rate, momentum=0.0, nesterov=False, weight_decay=0.0, *,
                 on_nonfinite="raise"):
        super().__init__(learning_rate, on_nonfinite=on_nonfinite)
        self.momentum = _validate.check_real("momentum", momentum, 0.0, 1.0, high_open=True)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov: expected a bool, got {type(nesterov).__name__}")
        if nesterov and self.momentum == 0.0:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0")
        self.nesterov = nesterov
        self.weight_decay = _validate.check_real("weight_decay", weight_decay, 0.0)
        self.state_names = ("momentum_buffer",) if self.momentum > 0 else ()
        self.hyperparams = dict(learning_rate=learning_rate, momentum=momentum,
                                nesterov=nesterov, weight_decay=weight_decay)

    def needs_params(self):
        return self.weight_decay != 0.0

    def step_scalars(self, t, lr):
        return (lr, self.momentum, self.weight_decay, self.nesterov)

    def _in_range(self, ns, views, plan):
        # the momentum buffer grows to |g|/(1-μ) and can overflow from finite gradients: with
        # momentum, the in-place kernel takes only gradients far from overflow (one more read of
        # the gradients); the others take the reference step, which checks the update
        return not self.state_names or gradients_in_range(views)

    def _range_check_finds_nonfinite(self) -> bool:
        return bool(self.state_names)  # with momentum, ‖g‖² of every gradient

    def array_step_scalars(self, xp, t, lr):
        """:meth:`step_scalars` with ``t`` and ``lr`` 0-d arrays (array ops only; a traced step)."""
        return (lr, self.momentum, self.weight_decay, self.nesterov)

    def reference(self, xp, p, g, states, scalars):
        lr, mu, wd, nesterov = scalars
        if wd != 0.0:
            g = g + wd * p
        if not states:
            return p - lr * g, []
        (buf,) = states
        buf = buf * mu + g
        d = g + mu * buf if nesterov else buf
        return p - lr * d, [buf]


class Adam(ElementwiseOptimizer):
    r"""Adam (``decoupled=False``, L2 decay as in ``torch.optim.Adam``) and AdamW.

    .. math::
        g_t \mathrel{+}= λ θ_{t-1}\ \text{(Adam)};\quad
        θ_{t-1} \leftarrow θ_{t-1}(1 - η_t λ)\ \text{(AdamW)}

        m_t = m_{t-1} + (1-β_1)(g_t - m_{t-1});\quad
        v_t = β_2 v_{t-1} + (1-β_2) g_t^2

        θ_t = θ_{t-1} - \frac{η_t}{1-β_1^t}\,
              \frac{m_t}{\sqrt{v_t}/\sqrt{1-β_2^t} + ε}
    """

    name = "adam"
    kernel_op = "adam"
    state_names = ("mu", "nu")

    def __init__(self, learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, *,
                 decoupled=False, on_nonfinite="raise"):
        super().__init__(learning_rate, on_nonfinite=on_nonfinite)
        self.b1 = _validate.check_real("b1", b1, 0.0, 1.0, high_open=True)
        self.b2 = _validate.check_real("b2", b2, 0.0, 1.0, high_open=True)
        self.eps = _validate.check_real("eps", eps, 0.0)
        self.weight_decay = _validate.check_real("weight_decay", weight_decay, 0.0)
        self.decoupled = bool(decoupled)
        if self.decoupled:
            self.name = "adamw"
        self.hyperparams = dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                                weight_decay=weight_decay)

    def needs_params(self):
        return self.weight_decay != 0.0

    def step_scalars(self, t, lr):
        step_size = lr / (1.0 - self.b1 ** t)
        bc2_sqrt = math.sqrt(1.0 - self.b2 ** t)
        l2 = 0.0 if self.decoupled else self.weight_decay
        decay = 1.0 - lr * self.weight_decay if self.decoupled else 1.0
        return (step_size, 1.0 - self.b1, self.b2, 1.0 - self.b2, bc2_sqrt, self.eps, l2, decay)

    def array_step_scalars(self, xp, t, lr):
        """:meth:`step_scalars` with ``t`` (float) and ``lr`` 0-d arrays: the bias corrections
        ``1 - β^t`` by array ops, so that a traced step computes them from a traced count."""
        step_size = lr / (1.0 - xp.pow(xp.full_like(t, self.b1), t))
        bc2_sqrt = xp.sqrt(1.0 - xp.pow(xp.full_like(t, self.b2), t))
        l2 = 0.0 if self.decoupled else self.weight_decay
        decay = 1.0 - lr * self.weight_decay if self.decoupled else 1.0
        return (step_size, 1.0 - self.b1, self.b2, 1.0 - self.b2, bc2_sqrt, self.eps, l2, decay)

    def reference(self, xp, p, g, states, scalars):
        step_size, omb1, b2, omb2, bc2_sqrt, eps, l2, decay = scalars
        m, v = states
        if l2 != 0.0:
            g = g + l2 * p
        if self.decoupled and self.weight_decay != 0.0:  # decay == 1 otherwise
            p = p * decay
        m = m + omb1 * (g - m)
        v = v * b2 + omb2 * (g * g)
        denom = xp.sqrt(v) / bc2_sqrt + eps
        return p - step_size * (m / denom), [m, v]


class AdaGrad(ElementwiseOptimizer):
    r"""AdaGrad as ``torch.optim.Adagrad`` (``lr_decay`` is a schedule here).

    .. math::
        g_t \mathrel{+}= λ θ_{t-1};\quad
        s_t = s_{t-1} + g_t^2;\quad
        θ_t = θ_{t-1} - η_t\, \frac{g_t}{\sqrt{s_t} + ε},\quad s_0 = \text{initial\_accumulator\_value}
    """

    name = "adagrad"
    kernel_op = "adagrad"
    state_names = ("sum",)

    def __init__(self, learning_rate=1e-2, eps=1e-10, initial_accumulator_value=0.0,
                 weight_decay=0.0, *, on_nonfinite="raise"):
        super().__init__(learning_rate, on_nonfinite=on_nonfinite)
        self.eps = _validate.check_real("eps", eps, 0.0)
        self.initial_accumulator_value = _validate.check_real(
            "initial_accumulator_value", initial_accumulator_value, 0.0)
        self.weight_decay = _validate.check_real("weight_decay", weight_decay, 0.0)
        self.hyperparams = dict(learning_rate=learning_rate, eps=eps,
                                initial_accumulator_value=initial_accumulator_value,
                                weight_decay=weight_decay)

    def needs_params(self):
        return self.weight_decay != 0.0

    def init_value(self, name):
        return self.initial_accumulator_value

    def step_scalars(self, t, lr):
        return (lr, self.eps, self.weight_decay)

    def array_step_scalars(self, xp, t, lr):
        """:meth:`step_scalars` with ``t`` and ``lr`` 0-d arrays (array ops only; a traced step)."""
        return (lr, self.eps, self.weight_decay)

    def reference(self, xp, p, g, states, scalars):
        lr, eps, wd = scalars
        (s,) = states
        if wd != 0.0:
            g = g + wd * p
        s = s + g * g
        return p - lr * (g / (xp.sqrt(s) + eps)), [s]


def sgd(learning_rate, momentum=0.0, nesterov=False, weight_decay=0.0, *, on_nonfinite="raise"):
    """SGD with momentum/Nesterov; see :class:`SGD`."""
    return SGD(learning_rate, momentum, nesterov, weight_decay, on_nonfinite=on_nonfinite)


def adam(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, *, on_nonfinite="raise"):
    """Adam with L2 weight decay added to the gradient (``torch.optim.Adam``); see :class:`Adam`."""
    return Adam(learning_rate, b1, b2, eps, weight_decay, decoupled=False, on_nonfinite=on_nonfinite)


def adamw(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, *, on_nonfinite="raise"):
    """AdamW: Adam with decoupled weight decay (``torch.optim.AdamW``); see :class:`Adam`."""
    return Adam(learning_rate, b1, b2, eps, weight_decay, decoupled=True, on_nonfinite=on_nonfinite)


def adagrad(learning_rate=1e-2, eps=1e-10, initial_accumulator_value=0.0, weight_decay=0.0, *,
            on_nonfinite="raise"):
    """AdaGrad (``torch.optim.Adagrad``); see :class:`AdaGrad`."""
    return AdaGrad(learning_rate, eps, initial_accumulator_value, weight_decay,
                   on_nonfinite=on_nonfinite)
