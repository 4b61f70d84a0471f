r"""Eva, Eva-f and Eva-s: Kronecker-vector preconditioning at first-order memory.

Zhang, Shi, Li, "Eva: Practical Second-order Optimization with Kronecker-vectorized
Approximation", ICLR 2023; "Eva: A General Vectorized Approximation Framework for
Second-order Optimization", arXiv:2308.02123 (Eva-f, Eva-s). Derivations (E1)–(E8) and
the oracles V1–V13 are in ``docs/eva.md``.

A weight leaf ``W`` of shape ``(d_out, d_in, …)`` (torch layout; a convolution kernel is
read as ``(d_out, d_in·k_h·k_w)``) with gradient ``G`` and Kronecker vectors ``ā`` (mean
layer input, a 1 appended when a bias leaf is its partner) and ``ḡ`` (mean loss gradient
w.r.t. the layer output), ``t`` the 1-based step, ``η_t`` the learning rate:

.. math::
    ā_t = ξ ā_{t-1} + (1-ξ) ā,\quad ḡ_t = ξ ḡ_{t-1} + (1-ξ) ḡ\quad(ā_1 = ā,\ ḡ_1 = ḡ)

    P = \frac1γ\Big(G - \frac{ḡ_t^\top G ā_t}{γ + \|ā_t\|^2\|ḡ_t\|^2}\, ḡ_t ā_t^\top\Big)
    \quad(\texttt{"eva"}),\qquad
    P = \frac1γ\Big(G - \frac{(Gā_t) ā_t^\top}{γ + \|ā_t\|^2}\Big)\quad(\texttt{"eva\_f"})

    ν = \min\big(1, \sqrt{κ / (η_t^2 Σ_l ⟨P_l, G_l⟩)}\big)\ (\texttt{kl\_mode="clip"}),\qquad
    d = νP

    d \mathrel{+}= λW;\quad b_t = μ b_{t-1} + d;\quad W_t = W_{t-1} - η_t\,(d + μ b_t \text{ if Nesterov else } b_t)

The bias column of ``P`` is the bias leaf's direction. Leaves without statistics
(biases without a weight partner, norms, embeddings) keep their raw gradient, are not
scaled by ``ν`` and take the same momentum step. ``"eva_s"`` (vectorized Shampoo) needs
no statistics: per tensor of order ``k ≥ 2`` it keeps one vector per axis,
``s_i ← ξ s_i + w·mean_{axes ≠ i}(G)`` (``w = 1`` when ``ξ = 1``, a running sum, else
``1 - ξ``), takes ``P = G - c·⊗s_i/(γ + Π‖s_i‖²)`` and rescales it to ``‖G‖`` (SGD-norm
grafting, :mod:`arrayopt.grafting`); vectors keep their gradient.

Statistics come in with the step: ``opt.step(params, grads, state, stats=stats)``, where
``stats`` maps a weight leaf (its path, e.g. ``"['fc1']['w']"``, or, in a flat dict of
params, its key) to ``{"a": ā, "g": ḡ, "bias": <bias leaf key>}`` or a tuple ``(ā, ḡ)`` (for a linear layer also
``{"input": x, "output_grad": dy, "bias": ...}``, the raw layer input and output gradient,
reduced here by :func:`~arrayopt.linalg.kv_linear` and :func:`~arrayopt.linalg.kv_grad`):
the vectors of :func:`arrayopt.linalg.kv_linear`, :func:`~arrayopt.linalg.kv_conv2d` and
:func:`~arrayopt.linalg.kv_grad`, or of :class:`arrayopt.interop.torch.KVCapture`. Eva-f
reads only ``a``. Unknown keys, statistics of a missing, 1-D or zero-size leaf, wrong
lengths, other namespaces or devices raise a named error before anything is written;
non-finite statistics raise in either ``on_nonfinite`` mode.

Defaults: ``stat_decay=0.05`` (``ξ``, the weight of the running value; ``1``, a running sum,
for Eva-s), ``kl_mode="clip"`` with ``kl_clip=0.001`` (also ``"rescale"``, ``"normalize"``,
``"none"``; Eva-s takes ``None``), ``momentum=0.9`` with weight decay added before the
momentum (:class:`arrayopt.first_order.SGD`'s step), ``update_every=1`` (the vectors'
refresh; every step is preconditioned), ``weight_layout="out_in"`` (``"in_out"``: weights
as ``(…, d_in, d_out)``, run by the reference math). Why each: ``docs/eva.md``.

>>> import numpy as np, arrayopt as ao
>>> from arrayopt.linalg import kv_linear, kv_grad
>>> rng = np.random.default_rng(0)
>>> params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(3, np.float32)}
>>> x, dy = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
>>> grads = {"w": dy.T @ x / 8, "b": dy.mean(0)}
>>> stats = {"w": {"a": kv_linear(x, has_bias=True), "g": kv_grad(dy), "bias": "b"}}
>>> opt = ao.eva(learning_rate=0.1)
>>> state = opt.init(params)
>>> params, state = opt.step(params, grads, state, stats=stats)
>>> state["count"], state["kv_updates"]
(1, [1, 0])
"""

from __future__ import annotations

import math
import threading

from .. import _validate
from .._xp import device_of, is_low_precision, state_dtype
from .._overflow import IN_RANGE, gradients_in_range
from ..base import Optimizer
from .stats import Shape, check_vector, reduce_raw, resolve, unpack
from .step import EvaStep
from ..first_order import SGD
from .math import axis_means, eva_f_precondition, eva_precondition, eva_s_graft_stacked, kl_scale, split_stack

#: Eva-s leaves with at most this many entries are stacked with the other leaves of their shape
STACK_MAX_SIZE = 1 << 16

__all__ = ["eva", "Eva", "VARIANTS"]

VARIANTS = ("eva", "eva_f", "eva_s")
_KL_MODES = ("clip", "rescale", "normalize", "none")


LAYOUTS = ("out_in", "in_out")


def _dims(shape, layout) -> tuple:
    """``(d_out, d_in)`` of a weight: ``(d_out, d_in, …)`` (``"out_in"``, torch) or ``(…, d_in, d_out)``
    (``"in_out"``, ``x @ W``: Flax, Keras, the demo's MLP), the other axes folded into ``d_in``."""
    if layout == "out_in":
        return int(shape[0]), math.prod(int(d) for d in shape[1:])
    return int(shape[-1]), math.prod(int(d) for d in shape[:-1])


class Eva(Optimizer):
    """Eva / Eva-f / Eva-s with the SGD-momentum step; see the module docstring."""

    name = "eva"
    takes_stats = True
    kernel_op = "eva"

    def __init__(self, learning_rate, momentum=0.9, damping=0.03, kl_clip=0.001, stat_decay=None,
                 weight_decay=0.0, variant="eva", update_every=1, *, kl_mode=None, nesterov=False,
                 weight_layout="out_in", on_nonfinite="raise"):
        super().__init__(on_nonfinite=on_nonfinite)
        self.variant = _validate.check_choice("variant", variant, VARIANTS)
        self.weight_layout = _validate.check_choice("weight_layout", weight_layout, LAYOUTS)
        self.learning_rate = _validate.check_learning_rate(learning_rate)
        self.damping = _validate.check_real("damping", damping, 0.0, low_open=True)
        if stat_decay is None:
            stat_decay = 1.0 if variant == "eva_s" else 0.05
        self.stat_decay = _validate.check_real("stat_decay", stat_decay, 0.0, 1.0)
        self.update_every = _validate.check_int("update_every", update_every, low=1)
        if variant == "eva_s":
            if kl_mode is not None:
                raise ValueError(f"kl_mode: eva_s rescales each tensor to the norm of its gradient and takes "
                                 f"no kl_mode, got {kl_mode!r}")
            self.kl_mode = "none"
        else:
            self.kl_mode = _validate.check_choice("kl_mode", "clip" if kl_mode is None else kl_mode, _KL_MODES)
        self.kl_clip = _validate.check_real("kl_clip", kl_clip, 0.0, low_open=self.kl_mode == "clip")
        self._sgd = SGD(learning_rate, momentum, nesterov, weight_decay)
        self.name = variant
        self._init_transient()
        self.hyperparams = dict(learning_rate=learning_rate, momentum=momentum, damping=damping,
                                kl_clip=kl_clip, stat_decay=self.stat_decay, weight_decay=weight_decay,
                                variant=variant, update_every=update_every, kl_mode=self.kl_mode,
                                nesterov=nesterov, weight_layout=weight_layout)

    _TRANSIENT = ("_jitted", "_jit_lock", "_groups")

    @property
    def per_leaf_dispatch(self) -> bool:
        """Eva-s steps each tensor on its own (no KL factor across layers, no weight-bias pairs): a
        leaf the kernel refuses takes the reference alone. Eva and Eva-f share ``ν`` over layers."""
        return self.variant == "eva_s"

    def _init_transient(self):
        # jax.jit'ed steps keyed by the plan and Eva-s's shape groups keyed by the tree's shapes:
        # filled under the lock, shared by threads
        object.__setattr__(self, "_jitted", {})
        object.__setattr__(self, "_groups", {})
        object.__setattr__(self, "_jit_lock", threading.Lock())

    # ------------------------------------------------------------------ state

    def _kv_names(self):
        return {"eva": ("kv_a", "kv_g"), "eva_f": ("kv_a",), "eva_s": ("kv_s",)}[self.variant]

    def _kv_shapes(self, shape):
        """The Kronecker-vector state of one leaf: its vector shapes (``None``: a leaf of fewer than 2 axes
        has no ``kv_a``/``kv_g``)."""
        if len(shape) < 2:
            return {"kv_a": None, "kv_g": None, "kv_s": []}
        d_out, d_in = _dims(shape, self.weight_layout)
        return {"kv_a": (d_in + 1,), "kv_g": (d_out,), "kv_s": [(int(d),) for d in shape]}

    def _init(self, ns, leaves):
        xp, dev = ns.xp, ns.device
        out = {}
        for name in self._sgd.state_names:
            out[name] = [xp.zeros(p.shape, dtype=state_dtype(xp, p.dtype), device=dev) for p in leaves]
        for name in self._kv_names():
            entries = []
            for p in leaves:
                want = self._kv_shapes(p.shape)[name]
                dt = state_dtype(xp, p.dtype)
                if name == "kv_s":
                    entries.append([xp.zeros(s, dtype=dt, device=dev) for s in want])
                elif want is None:
                    entries.append(None)
                else:
                    entries.append(xp.zeros(want, dtype=dt, device=dev))
            out[name] = entries
        out["kv_updates"] = [0 for _ in leaves]
        return out

    def _check_state(self, ns, leaves, paths, state, params_missing):
        if params_missing and self._sgd.weight_decay != 0.0:
            raise ValueError(f"params: {self.name} with weight decay needs the params in update()")
        dtypes = [state_dtype(ns.xp, p.dtype) for p in leaves]
        for name in self._sgd.state_names + self._kv_names() + ("kv_updates",):
            if name not in state:
                raise ValueError(f"state: missing entry {name!r}; was it made by this optimizer's init()?")
            if not isinstance(state[name], (list, tuple)) or len(state[name]) != len(paths):
                raise ValueError(f"state[{name!r}]: expected {len(paths)} entries, one per params leaf")
        for name in self._sgd.state_names:
            _validate.check_state_leaves(name, state[name], paths, ns, leaves, dtypes)
        for name in self._kv_names():
            for entry, p, path, dt in zip(state[name], leaves, paths, dtypes):
                want = self._kv_shapes(p.shape)[name]
                if want is None:
                    if entry is not None:
                        raise ValueError(f"state[{name!r}] leaf {path}: expected None (a leaf of shape "
                                         f"{tuple(p.shape)} has no Kronecker vector)")
                    continue
                arrays, shapes = (entry, want) if name == "kv_s" else ([entry], [want])
                if not isinstance(arrays, (list, tuple)) or len(arrays) != len(shapes):
                    raise ValueError(f"state[{name!r}] leaf {path}: expected {len(shapes)} vectors")
                for arr, shape in zip(arrays, shapes):
                    _validate.check_state_leaves(name, [arr], [path], ns, [Shape(shape)], [dt])
        for n, path in zip(state["kv_updates"], paths):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"state['kv_updates'] leaf {path}: expected a non-negative int, got {n!r}")

    # ------------------------------------------------------------------ statistics

    def _check_stats(self, ns, leaves, paths, stats):
        """Resolve ``stats`` to ``{weight path: (a, g, bias path or None)}``; raise on anything wrong."""
        if self.variant == "eva_s":
            if stats is not None:
                raise TypeError("stats: eva_s takes no statistics (it uses the gradients only); "
                                "call it without stats=")
            return None
        if stats is None:
            return {}
        if not isinstance(stats, dict):
            raise TypeError(f"stats: expected a dict mapping weight leaves to their (a, g), "
                            f"got {type(stats).__name__}")
        index = {path: i for i, path in enumerate(paths)}
        resolved, biases = {}, {}
        for key, value in stats.items():
            wpath = resolve(key, index, f"stats[{key!r}]")
            where = f"stats[{key!r}] (leaf {wpath})"
            w = leaves[index[wpath]]
            if len(w.shape) < 2:
                raise ValueError(f"{where}: the leaf has shape {tuple(w.shape)}; statistics go with weight "
                                 f"leaves of 2 or more axes (d_out, d_in, ...)")
            if any(int(d) == 0 for d in w.shape):
                raise ValueError(f"{where}: the leaf has zero size {tuple(w.shape)}; give it no statistics")
            if wpath in resolved:
                raise ValueError(f"{where}: the leaf has statistics under two keys")
            a, g, bias, raw_in, raw_out = unpack(value, where)
            bpath = None
            d_out, d_in = _dims(w.shape, self.weight_layout)
            if bias is not None:
                bpath = resolve(bias, index, f"{where}['bias']")
                b = leaves[index[bpath]]
                if tuple(b.shape) != (d_out,):
                    raise ValueError(f"{where}['bias']: bias leaf {bpath} has shape {tuple(b.shape)}, expected "
                                     f"({d_out},) (one entry per output of the weight, "
                                     f"weight_layout={self.weight_layout!r})")
                if bpath in biases:
                    raise ValueError(f"{where}['bias']: bias leaf {bpath} is also the bias of {biases[bpath]}")
                biases[bpath] = wpath
            n_in = d_in + (bpath is not None)
            a, g = reduce_raw(ns, where, a, g, raw_in, raw_out, bpath is not None, d_in, d_out)
            a = check_vector(ns, f"{where}['a']", a, n_in,
                              "d_in + 1: the input mean with the appended 1 of the bias" if bpath else
                              "d_in (with a bias partner, name it under 'bias' and append 1 to a)")
            if self.variant == "eva":
                g = check_vector(ns, f"{where}['g']", g, d_out, f"d_out (weight_layout={self.weight_layout!r})")
            resolved[wpath] = (a, g if self.variant == "eva" else None, bpath)
        for bpath, wpath in biases.items():
            if bpath in resolved:
                raise ValueError(f"stats: leaf {bpath} is the bias of {wpath} and has statistics of its own")
        return resolved

    # ------------------------------------------------------------------ backend contract

    def step_description(self, count: int) -> EvaStep:
        """The frozen :class:`EvaStep` of step ``count + 1`` (what backends receive)."""
        sgd = self._sgd
        return EvaStep(lr=_validate.learning_rate_at(self.learning_rate, count), momentum=sgd.momentum,
                       weight_decay=sgd.weight_decay, nesterov=sgd.nesterov, damping=self.damping,
                       variant=self.variant, kl_mode=self.kl_mode, kl_clip=self.kl_clip,
                       weight_layout=None if self.variant == "eva_s" else self.weight_layout,
                       stat_decay=self.stat_decay)

    def _kernel_groups(self, leaves, g_leaves, state):
        return (leaves, g_leaves, *[state[n] for n in self._sgd.state_names])

    # ------------------------------------------------------------------ math

    def _compute(self, ns, leaves, g_leaves, state, paths, stats):
        """``(p_old, p_new, new_state)`` per leaf in the state dtype.

        Python decides the plan (which leaves have statistics, their bias partners, which
        vectors are refreshed); :meth:`_apply_plan` is the array math, pure array-API code,
        run under ``jax.jit`` for JAX arrays (one compile per plan and shapes).
        """
        xp = ns.xp
        lr = _validate.learning_rate_at(self.learning_rate, state["count"])
        plan, stat_arrays, updates = self._plan(xp, leaves, state, paths, stats)
        p32 = [xp.astype(p, xp.float32) if is_low_precision(p.dtype) else p for p in leaves]
        dirs = [xp.astype(g, xp.float32) if is_low_precision(g.dtype) else g for g in g_leaves]
        bufs = [[state[n][i] for n in self._sgd.state_names] for i in range(len(leaves))]
        kv = {name: list(state[name]) for name in self._kv_names()}
        if ns.library == "jax":
            news, new_bufs, kv = self._jitted_plan(ns, plan)(lr, p32, dirs, bufs, kv, stat_arrays)
        else:
            news, new_bufs, kv = self._apply_plan(ns, plan, lr, p32, dirs, bufs, kv, stat_arrays)
        new_bufs = {name: [b[k] for b in new_bufs] for k, name in enumerate(self._sgd.state_names)}
        return p32, news, self._new_state(state, new_bufs, kv, updates)

    def _new_state(self, state, bufs, kv, updates):
        new_state = dict(state)
        new_state["count"] = state["count"] + 1
        new_state.update(bufs)
        new_state.update(kv)
        new_state["kv_updates"] = updates
        return new_state

    @staticmethod
    def _check_stats_finite(xp, stats, raise_=True):
        for wpath, (a, g, _) in stats.items():
            if not _validate.all_finite(xp, [a] + ([g] if g is not None else [])):
                if not raise_:
                    return False
                raise ValueError(f"stats leaf {wpath}: contains NaN or Inf; the step was rejected and the "
                                 f"state is unchanged")
        return True

    def _plan(self, xp, leaves, state, paths, stats, check_stats=True):
        """What this step does, decided in Python: ``(plan, stat_arrays, new kv_updates)``.

        Eva/Eva-f: ``plan`` holds ``(leaf, bias leaf or None, refresh, first)`` per weight with
        statistics, ``stat_arrays`` its ``(a, g)``; Eva-s: the leaves whose vectors are refreshed.
        """
        refresh_step = state["count"] % self.update_every == 0
        updates = list(state["kv_updates"])
        if self.variant == "eva_s":
            plan = tuple(i for i, p in enumerate(leaves) if len(p.shape) >= 2) if refresh_step else ()
            stat_arrays = []
            for i in plan:
                updates[i] += 1
        else:
            stats = stats or {}
            if check_stats:
                self._check_stats_finite(xp, stats)
            index = {path: i for i, path in enumerate(paths)}
            plan, stat_arrays = [], []
            for wpath, (a, g, bpath) in stats.items():
                i = index[wpath]
                first = state["kv_updates"][i] == 0
                refresh = refresh_step or first
                plan.append((i, index[bpath] if bpath is not None else None, refresh, first))
                stat_arrays.append((a, g))
                if refresh:
                    updates[i] += 1
            plan = tuple(plan)
        return plan, stat_arrays, updates

    def _jitted_plan(self, ns, plan):
        """:meth:`_apply_plan` under ``jax.jit``; whether a layer's vectors are refreshed this step and
        whether it is their first observation are traced flags, so the first step, the refresh steps
        and the steps between them share one compilation."""
        import jax
        import jax.numpy as jnp

        dynamic = self.variant != "eva_s"
        static = tuple((i, b, None, None) for i, b, _, _ in plan) if dynamic else plan
        key = (ns.library, static)
        fn = self._jitted.get(key)
        if fn is None:
            def run(flags, lr, p32, dirs, bufs, kv, stat_arrays):
                full = tuple((i, b, r, f) for (i, b, _, _), (r, f) in zip(static, flags)) if dynamic else static
                return self._apply_plan(ns, full, lr, p32, dirs, bufs, kv, stat_arrays)

            with self._jit_lock:
                fn = self._jitted.setdefault(key, jax.jit(run))
        flags = [(jnp.asarray(e[2]), jnp.asarray(e[3])) for e in plan] if dynamic else []
        return lambda *args: fn(flags, *args)

    def _apply_plan(self, ns, plan, lr, p32, dirs, bufs, kv, stat_arrays):
        """Directions, then the SGD-momentum step: ``(new params, new momentum buffers, new vectors)``."""
        xp = ns.xp
        dirs, kv = list(dirs), {k: list(v) for k, v in kv.items()}
        if self.variant == "eva_s":
            self._eva_s_directions(xp, dirs, kv, plan)
        else:
            self._eva_directions(xp, lr, dirs, kv, plan, stat_arrays)
        scalars = self._sgd.step_scalars(0, lr)  # (lr, μ, λ, nesterov): no step dependence
        news, new_bufs = [], []
        for p, d, b in zip(p32, dirs, bufs):
            p_new, b_new = self._sgd._reference(ns, p, d, b, scalars)
            news.append(p_new)
            new_bufs.append(b_new)
        return news, new_bufs, kv

    def _ema(self, old, value, first, xp=None):
        """(E8); ``first`` a bool, or a traced flag under ``jax.jit``."""
        if isinstance(first, bool):
            return value if first else old * self.stat_decay + value * (1.0 - self.stat_decay)
        return xp.where(first, value, old * self.stat_decay + value * (1.0 - self.stat_decay))

    def _refresh(self, xp, kv, plan, stat_arrays):
        """Refresh the running vectors of the plan (E8); return ``(i, b, ā, ḡ)`` per layer, ``ā``
        cut to the weight's columns (+ the bias entry), ``ḡ`` ``None`` for Eva-f."""
        out = []
        for (i, b, refresh, first), (a, g) in zip(plan, stat_arrays):
            dt = kv["kv_a"][i].dtype
            if refresh is not False:  # True, or a traced flag under jax.jit
                a = xp.astype(a, dt)
                if b is None:
                    a = xp.concat([a, xp.zeros((1,), dtype=dt, device=device_of(a))])
                names = ("kv_a", "kv_g") if g is not None else ("kv_a",)
                for name, v in zip(names, (a, xp.astype(g, dt) if g is not None else None)):
                    new = self._ema(kv[name][i], v, first, xp)
                    kv[name][i] = new if refresh is True else xp.where(refresh, new, kv[name][i])
            a_use = kv["kv_a"][i] if b is not None else kv["kv_a"][i][:-1]
            out.append((i, b, a_use, kv["kv_g"][i] if self.variant == "eva" else None))
        return out

    def _eva_directions(self, xp, lr, dirs, kv, plan, stat_arrays):
        layers, inners, p_sq, g_sq = [], [], [], []
        for i, b, a_use, g_use in self._refresh(xp, kv, plan, stat_arrays):
            G = dirs[i]
            d_out, n_in = _dims(G.shape, self.weight_layout)
            if self.weight_layout == "out_in":
                G2 = xp.reshape(G, (d_out, n_in))
            else:
                G2 = xp.permute_dims(xp.reshape(G, (n_in, d_out)), (1, 0))
            if b is not None:
                G2 = xp.concat([G2, xp.reshape(dirs[b], (d_out, 1))], axis=1)
            if self.variant == "eva":
                P, inner = eva_precondition(G2, a_use, g_use, self.damping)
            else:
                P, inner = eva_f_precondition(G2, a_use, self.damping)
            layers.append((i, b, P, n_in))
            inners.append(inner)
            if self.kl_mode == "rescale":
                p_sq.append(xp.sum(P * P))
                g_sq.append(xp.sum(G2 * G2))
        if not layers:
            return
        nu = None
        if self.kl_mode != "none":
            nu = kl_scale(inners, lr, self.kl_clip, self.kl_mode, p_sq=p_sq or None, g_sq=g_sq or None)
        for i, b, P, n_in in layers:
            if nu is not None:
                P = P * nu
            W = P[:, :n_in] if self.weight_layout == "out_in" else xp.permute_dims(P[:, :n_in], (1, 0))
            dirs[i] = xp.reshape(W, dirs[i].shape)
            if b is not None:
                dirs[b] = P[:, n_in]

    def _eva_s_groups(self, dirs):
        """Eva-s's leaves of two or more axes grouped by ``(shape, dtype)``: tuples of leaf indices;
        a leaf above :data:`STACK_MAX_SIZE` entries is a group of its own (cached by the tree's
        shapes and dtypes)."""
        key = tuple((tuple(int(d) for d in G.shape), str(G.dtype)) for G in dirs)
        groups = self._groups.get(key)
        if groups is None:
            keyed, alone = {}, []
            for i, (shape, dt) in enumerate(key):
                if len(shape) < 2:
                    continue
                if math.prod(shape) > STACK_MAX_SIZE:
                    alone.append((i,))
                else:
                    keyed.setdefault((shape, dt), []).append(i)
            groups = tuple(alone) + tuple(tuple(v) for v in keyed.values())
            with self._jit_lock:
                groups = self._groups.setdefault(key, groups)
        return groups

    def _eva_s_directions(self, xp, dirs, kv, refreshed):
        """Eva-s (E4) on stacks of same-shaped leaves: the vectors' refresh and the grafted direction."""
        w = 1.0 if self.stat_decay == 1.0 else 1.0 - self.stat_decay
        for group in self._eva_s_groups(dirs):
            n = len(group)
            G = dirs[group[0]][None, ...] if n == 1 else xp.stack([dirs[i] for i in group])
            s = [(v[0][None, ...] if n == 1 else xp.stack(list(v))) for v in zip(*[kv["kv_s"][i] for i in group])]
            fresh = [i in refreshed for i in group]
            if any(fresh):
                means = axis_means(xp, G)
                new = [s_j * self.stat_decay + m_j * w for s_j, m_j in zip(s, means)]
                if all(fresh):
                    s = new
                else:  # a plan refreshes all leaves of two or more axes or none; kept general
                    mask = xp.asarray(fresh, device=device_of(G))[:, None]
                    s = [xp.where(mask, a, b) for a, b in zip(new, s)]
                per_leaf = [split_stack(xp, v, n) for v in s]
                for b, i in enumerate(group):
                    kv["kv_s"][i] = [v[b] for v in per_leaf]
            out = eva_s_graft_stacked(G, s, self.damping)
            for i, d in zip(group, split_stack(xp, out, n)):
                dirs[i] = d

    def _update(self, ns, leaves, g_leaves, state, paths, stats=None):
        olds, news, new_state = self._compute(ns, leaves, g_leaves, state, paths, stats)
        updates = [ns.xp.astype(q - o, p.dtype) if is_low_precision(p.dtype) else q - o
                   for p, o, q in zip(leaves, olds, news)]
        return updates, new_state

    _step = Optimizer._fused_step

    def _reference_step(self, ns, leaves, g_leaves, state, paths, stats=None):
        _, news, new_state = self._compute(ns, leaves, g_leaves, state, paths, stats)
        return [ns.xp.astype(q, p.dtype) if is_low_precision(p.dtype) else q for p, q in zip(leaves, news)], new_state

    def _kernel_plan(self, ns, leaves, g_leaves, state, paths, stats=None):
        """``(plan, stat arrays, new kv_updates, covered)`` (:meth:`_plan`; the statistics are checked
        by :meth:`_in_range`); ``covered``: the leaves whose gradients the kernel's first pass checks
        (Eva/Eva-f: the weights with statistics and their biases; Eva-s: every leaf of 2 or more
        axes, whose first passes also check the range)."""
        plan, stat_arrays, updates = self._plan(ns.xp, leaves, state, paths, stats, check_stats=False)
        if self.variant == "eva_s":
            covered = frozenset(i for i, p in enumerate(leaves) if len(p.shape) >= 2)
        else:
            covered = frozenset(i for i, _, _, _ in plan) | frozenset(b for _, b, _, _ in plan if b is not None)
        return plan, stat_arrays, updates, covered

    def _prepass_views(self, views, plan):
        # the kernels' first pass reads the preconditioned gradients and reports a non-finite one
        # before anything is written; the other leaves get the pre-pass (a backend's views keep
        # their kind, and with it their batched pre-pass and range check)
        keep = [k for k in range(len(views)) if k not in plan[3]]
        take = getattr(views, "take", None)
        return take(keep) if take is not None else [views[k] for k in keep]

    def _in_range(self, ns, views, plan):
        # every gradient, and statistics whose ‖ā‖², ‖ḡ‖² and product stay below the same bound
        # (so ḡᵀGā and ‖ā‖²‖ḡ‖² cannot overflow); else the reference step, which reports a
        # non-finite gradient first, then non-finite statistics, then a non-finite update.
        # Eva-s's kernel checks the range of the leaves it preconditions in its first passes
        if self.variant == "eva_s":
            return gradients_in_range(self._prepass_views(views, plan))
        if not gradients_in_range(views):
            return False
        xp = ns.xp
        for a, g in plan[1]:
            bound = float(xp.finfo(a.dtype).max) * IN_RANGE
            sa = float(xp.sum(a * a))
            sg = float(xp.sum(g * g)) if g is not None else 1.0
            if not (sa < bound and sg < bound and sa * sg < bound):
                return False
        return True

    def _run_kernel(self, backend, step, views, plan, ns, leaves, g_leaves, state, paths, stats=None):
        xp = ns.xp
        plan, stat_arrays, updates, _ = plan
        kv = {name: list(state[name]) for name in self._kv_names()}
        # Eva-s: the kernel refreshes the vectors of the plan in place
        layers = (plan, kv["kv_s"]) if self.variant == "eva_s" else self._refresh(xp, kv, plan, stat_arrays)
        bufs = state[self._sgd.state_names[0]] if self._sgd.state_names else None
        if backend.run(self.kernel_op, leaves, g_leaves, [bufs, layers], step, g_views=views) is False:
            return None  # a non-finite value, nothing written: the reference step decides
        kept = {n: state[n] for n in self._sgd.state_names}
        return self._new_state(state, kept, kv, updates)


def eva(learning_rate, momentum=0.9, damping=0.03, kl_clip=0.001, stat_decay=None, weight_decay=0.0,
        variant="eva", update_every=1, *, kl_mode=None, nesterov=False, weight_layout="out_in",
        on_nonfinite="raise"):
    """Eva (``variant="eva"``), Eva-f (``"eva_f"``) or Eva-s (``"eva_s"``); see :class:`Eva`."""
    return Eva(learning_rate, momentum, damping, kl_clip, stat_decay, weight_decay, variant, update_every,
               kl_mode=kl_mode, nesterov=nesterov, weight_layout=weight_layout, on_nonfinite=on_nonfinite)
