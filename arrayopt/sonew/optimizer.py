r"""SONew: sparsified online Newton with diagonal, tridiagonal and banded LogDet preconditioners.

Devvrit, Duvvuri, Anil, Gupta, Hsieh, Dhillon, "A Computationally Efficient
Sparsified Online Newton Method", NeurIPS 2023 (arXiv:2311.10085). The
derivations (equations (S1)–(S10)) and the test oracles O1–O18 are in
``docs/sonew.md``.

One step, per parameter tensor (flattened to a vector of ``n`` entries, (S9)),
``t`` the 1-based step and ``b`` the half-bandwidth (``band``):

.. math::
    m_t = m_{t-1} + (1-β_1)(g_t - m_{t-1}),\qquad
    B_t[i,k] = β_2 B_{t-1}[i,k] + (1-β_2)\, g_i g_{i+k}\quad(k = 0..b)

    \hat m = m_t/(1-β_1^t),\qquad \hat H = B_t/(1-β_2^t),\qquad
    H = \hat H + ε_{\rm eff} I,\quad ε_{\rm eff} = \max(ε\,\|\hat H\|_{∞,\rm band},\ ε_{\min})

    X = \arg\min_{X \in S_n(G_b),\,X\succ 0} -\log\det X + \operatorname{tr}(XH) = L D L^\top
    \quad(\text{closed form, } \texttt{sonew\_factor})

    u = X \hat m,\qquad
    u \leftarrow u\,\frac{\|a\|_2}{\|u\|_2},\ a = \frac{\hat m}{\sqrt{\hat H_{ii}} + ε_g}\ \text{(Adam graft)},\qquad
    θ_t = θ_{t-1} - η_t\,(u + λ θ_{t-1})

``band=0`` is diag-SONew (``X = diag(1/H_jj)``: ``m̂/(v̂ + ε)``, no square
root), ``band=1`` tridiagonal SONew, ``band=b`` banded SONew. ``B[:, 0]`` is
exactly Adam's ``v``, so the Adam graft costs no memory. State per tensor:
``mu`` (shape of the param) and ``band`` (``(n, b+1)``), float32 for
bfloat16/float16 params; memory ``(b+2)·n`` (tridiagonal ``3n``, Adam ``2n``).

Options (the choices between the published reference codes, and why: ``docs/sonew.md``):
``relative_eps`` (``ε`` relative to the band ∞-norm of ``Ĥ``, floored at ``eps_min``);
``graft`` in ``"adam"``, ``"none"``, ``"sgd"``, ``"momentum"``, ``"rmsprop_normalized"``
(``‖u‖ = 0`` guarded); ``tau_factor`` (the stability rule (S7): per row, keep the first
``k`` neighbours whose Schur complements stay above ``τ·H_jj``, ``τ = tau_factor·u``; the
dropped edges and fallback rows, summed over steps, are ``state["removed_edges"]`` and
``state["fallback_rows"]``, one 0-d int array per leaf); ``flatten_order`` (``"fan_in"``
= ``"C"``, last axis fastest; ``"F"`` first axis fastest); ``small_param_fallback``
(``"adam"``: tensors with ``ndim <= 1`` take the Adam direction ``a``).

``block_size=B`` (default ``16384``) is **block-local SONew** (S10): each flattened tensor
is cut into blocks of ``B`` consecutive entries; the band is cut at block edges and
``ε_eff`` and both graft norms are taken per block, so a block is a tensor of its own and
a kernel finishes it in one pass over memory. Tensors of at most ``B`` entries get the
whole-tensor step (bit for bit on the reference path, to float rounding in the fused
kernels); ``block_size=None`` gives every tensor the whole-tensor step (the paper's form).

Backends receive :class:`arrayopt.sonew.step.SONewStep` (:meth:`SONew.step_description`),
never the optimizer; ``ao.explain(opt, params)`` shows the path each leaf takes.

>>> import numpy as np, arrayopt as ao
>>> params = {"w": np.ones((3, 4), np.float32)}
>>> opt = ao.sonew(learning_rate=0.1, band=1)
>>> state = opt.init(params)
>>> params, state = opt.step(params, {"w": np.full((3, 4), 0.5, np.float32)}, state)
>>> round(float(params["w"][0, 0]), 4), state["count"]
(0.7551, 1)
"""

from __future__ import annotations

import dataclasses
import math
import threading

from .. import _validate, grafting
from .._xp import is_low_precision, state_dtype
from ..base import Optimizer
from .math import band_outer, band_rowsum_max, band_rowsums, sonew_apply, sonew_factor_guarded
from .step import SONewStep

__all__ = ["sonew", "SONew"]

GRAFTS = ("adam", "none", "sgd", "momentum", "rmsprop_normalized")
ORDERS = ("fan_in", "C", "F")
# block-local by default: the one-pass step (S10); the reason for 16384 is in the class docstring
DEFAULT_BLOCK_SIZE = 16384
FALLBACKS = ("sonew", "adam")


def _vec(xp, x, order):
    """Flatten in the band's order (``"F"``: first axis fastest)."""
    if order == "F" and len(x.shape) > 1:
        x = xp.permute_dims(x, tuple(reversed(range(len(x.shape)))))
    return xp.reshape(x, (-1,))


def _unvec(xp, v, shape, order):
    if order == "F" and len(shape) > 1:
        v = xp.reshape(v, tuple(reversed(shape)))
        return xp.permute_dims(v, tuple(reversed(range(len(shape)))))
    return xp.reshape(v, shape)


def _block_mask(xp, n, b, block_size, device):
    """``mask[i, k]``: ``i`` and ``i+k`` lie in the same block (``None``: no cuts)."""
    if block_size is None or block_size >= n or b == 0:
        return None
    i = xp.reshape(xp.arange(n, device=device), (n, 1))
    k = xp.reshape(xp.arange(b + 1, device=device), (1, b + 1))
    return (i // block_size) == ((i + k) // block_size)


def _per_entry(xp, per_block, n, block_size, device):
    """Each entry's value of its block: ``out[j] = per_block[j // block_size]``."""
    return xp.take(per_block, xp.arange(n, device=device) // block_size)


def _block_max(xp, x, block_size):
    """``max`` over each block of ``block_size`` consecutive entries of ``x >= 0`` (zero-padded)."""
    n = x.shape[0]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    if pad:
        x = xp.concat([x, xp.zeros((pad,), dtype=x.dtype, device=_dev(x))])
    return xp.max(xp.reshape(x, (nb, block_size)), axis=1)


#: the largest half-bandwidth accepted (state and factorization grow with it; see ``band``)
MAX_BAND = 1024


class SONew(Optimizer):
    """SONew; see the module docstring for the math and the defaults."""

    name = "sonew"

    def __init__(self, learning_rate=1e-3, band=1, b1=0.9, b2=0.999, eps=1e-6, graft="adam",
                 weight_decay=0.0, *, graft_eps=1e-8, relative_eps=True, eps_min=1e-30,
                 tau_factor=4.0, flatten_order="fan_in", block_size=DEFAULT_BLOCK_SIZE,
                 small_param_fallback="sonew", on_nonfinite="raise"):
        super().__init__(on_nonfinite=on_nonfinite)
        self.learning_rate = _validate.check_learning_rate(learning_rate)
        self.band = _validate.check_int("band", band, low=0)
        if self.band > MAX_BAND:
            raise ValueError(f"band: must be <= {MAX_BAND}, got {self.band}; the state keeps n·(band+1) "
                             f"statistics per tensor of n entries and the factorization costs O(n·band²) "
                             f"per step (bands beyond a tensor's n - 1 entries hold zeros only)")
        self.b1 = _validate.check_real("b1", b1, 0.0, 1.0, high_open=True)
        self.b2 = _validate.check_real("b2", b2, 0.0, 1.0, high_open=True)
        self.eps = _validate.check_real("eps", eps, 0.0)
        self.graft = _validate.check_choice("graft", graft, GRAFTS)
        self.weight_decay = _validate.check_real("weight_decay", weight_decay, 0.0)
        self.graft_eps = _validate.check_real("graft_eps", graft_eps, 0.0)
        if not isinstance(relative_eps, bool):
            raise TypeError(f"relative_eps: expected a bool, got {type(relative_eps).__name__}")
        self.relative_eps = relative_eps
        self.eps_min = _validate.check_real("eps_min", eps_min, 0.0)
        if self.eps == 0.0 and (not relative_eps or self.eps_min == 0.0):
            raise ValueError("eps: must be > 0 (or relative with eps_min > 0); "
                             "H + eps·I must be positive definite")
        self.tau_factor = _validate.check_real("tau_factor", tau_factor, 0.0)
        self.flatten_order = _validate.check_choice("flatten_order", flatten_order, ORDERS)
        self.order = "F" if flatten_order == "F" else "C"
        if block_size is not None:
            block_size = _validate.check_int("block_size", block_size, low=1)
        self.block_size = block_size
        self.small_param_fallback = _validate.check_choice(
            "small_param_fallback", small_param_fallback, FALLBACKS)
        self.hyperparams = dict(learning_rate=learning_rate, band=band, b1=b1, b2=b2, eps=eps, graft=graft,
                                weight_decay=weight_decay)
        # the step description without its per-step scalars (lr, bc1, bc2)
        self._template = SONewStep(
            lr=0.0, bc1=1.0, bc2=1.0, b1=self.b1, b2=self.b2, band=self.band, eps=self.eps,
            eps_min=self.eps_min, relative_eps=relative_eps, tau_factor=self.tau_factor, graft=self.graft,
            graft_eps=self.graft_eps, weight_decay=self.weight_decay, order=self.order,
            block_size=block_size, small_param_fallback=self.small_param_fallback)
        self._init_transient()

    kernel_op = "sonew"
    per_leaf_dispatch = True  # each tensor's step is its own: refused leaves take the reference alone
    _TRANSIENT = ("_jitted", "_jit_lock")

    def _init_transient(self):
        # jax.jit'ed steps keyed by (namespace, small): filled under the lock, shared by threads
        object.__setattr__(self, "_jitted", {})
        object.__setattr__(self, "_jit_lock", threading.Lock())

    # ------------------------------------------------------------------ state

    def _state_names(self):
        names = ["mu", "band"]
        if self.graft == "rmsprop_normalized":
            names.append("graft_nu")
        return names

    def _init(self, ns, leaves):
        xp, dev = ns.xp, ns.device
        b = self.band
        out = {
            "mu": [xp.zeros(p.shape, dtype=state_dtype(xp, p.dtype), device=dev) for p in leaves],
            "band": [xp.zeros((math.prod(p.shape), b + 1), dtype=state_dtype(xp, p.dtype), device=dev)
                     for p in leaves],
        }
        if self.graft == "rmsprop_normalized":
            out["graft_nu"] = [xp.zeros(p.shape, dtype=state_dtype(xp, p.dtype), device=dev) for p in leaves]
        out["removed_edges"] = [xp.zeros((), dtype=xp.int64, device=dev) for _ in leaves]
        out["fallback_rows"] = [xp.zeros((), dtype=xp.int64, device=dev) for _ in leaves]
        return out

    def _check_state(self, ns, leaves, paths, state, params_missing):
        if params_missing and self.weight_decay != 0.0:
            raise ValueError(f"params: {self.name} with weight decay needs the params in update()")
        dtypes = [state_dtype(ns.xp, p.dtype) for p in leaves]
        for name in self._state_names() + ["removed_edges", "fallback_rows"]:
            if name not in state:
                raise ValueError(f"state: missing entry {name!r}; was it made by this optimizer's init()?")
        _validate.check_state_leaves("mu", state["mu"], paths, ns, leaves, dtypes)
        if "graft_nu" in state:
            _validate.check_state_leaves("graft_nu", state["graft_nu"], paths, ns, leaves, dtypes)
        b = self.band
        band_like = [_ShapeOnly((math.prod(p.shape), b + 1)) for p in leaves]
        _validate.check_state_leaves("band", state["band"], paths, ns, band_like, dtypes)
        n = len(paths)
        for name in ("removed_edges", "fallback_rows"):
            arrs = state[name]
            if not isinstance(arrs, (list, tuple)) or len(arrs) != n:
                raise ValueError(f"state[{name!r}]: expected {n} entries, one per params leaf")
            if _validate._fast_like(arrs, [()] * n, [ns.xp.int64] * n, ns):  # as init() makes them
                continue
            for a, path in zip(arrs, paths):
                if ns.xp is not _ns_of(f"state[{name!r}]", path, a) or tuple(a.shape) != ():
                    raise ValueError(f"state[{name!r}] leaf {path}: expected a 0-d integer array "
                                     f"of the params' namespace")

    # ------------------------------------------------------------------ math

    def step_description(self, count: int) -> SONewStep:
        """The frozen :class:`SONewStep` of step ``count + 1`` (what backends receive)."""
        lr = _validate.learning_rate_at(self.learning_rate, count)
        t = count + 1
        return self._template.with_scalars(lr, 1.0 - self.b1 ** t, 1.0 - self.b2 ** t)

    def _kernel_groups(self, leaves, g_leaves, state):
        nu = (state["graft_nu"],) if "graft_nu" in state else ()
        return (leaves, g_leaves, state["mu"], state["band"]) + nu

    def reference_leaf(self, xp, p, g, m, band, nu, step, jit=False):
        """One tensor's step in the compute dtype: returns ``(update, m, band, nu, removed, fallback)``.

        Pure array-API code; ``update`` is what is added to ``p``. ``step``: the
        :class:`SONewStep`; ``jit``: run under ``jax.jit`` (JAX arrays).
        """
        shape, order = p.shape, step.order
        n = math.prod(shape)
        flat = [_vec(xp, x, order) if x is not None else None for x in (p, g, m, nu)]
        small = len(shape) <= 1
        b_eff = step.effective_band(n)
        rest = None
        if b_eff < step.band:  # pairs beyond the tensor (block) hold zeros: the step of band b_eff
            rest = band[:, b_eff + 1:] * step.b2
            band = band[:, :b_eff + 1]
            step = dataclasses.replace(step, band=b_eff)
        if jit:  # one XLA compile per (size bucket, options), not per op and shape
            u, m2, band, nu2, removed, fallback = self._jax_flat(xp, *flat, band, step, small, n)
        else:
            u, m2, band, nu2, removed, fallback = self.flat_leaf(xp, *flat, band, step, small, n)
        if rest is not None:
            band = xp.concat([band, rest], axis=1)
        unv = [_unvec(xp, x, shape, order) if x is not None else None for x in (u, m2, nu2)]
        return unv[0], unv[1], band, unv[2], removed, fallback

    @staticmethod
    def flat_leaf(xp, p, g, m, nu, band, step, small, n_real):
        """The step on flattened vectors (entries past ``n_real`` are zero padding).

        Reads nothing but its arguments: ``step`` (:class:`SONewStep`) holds every
        hyperparameter, resolved for this step.
        """
        lr, bc1, bc2 = step.lr, step.bc1, step.bc2
        b = step.band
        n = g.shape[0]
        dev = _dev(p)
        bsz = step.block_size
        blocked = bsz is not None and bsz < n  # block-local: ε and graft norms per block
        m = m + (1.0 - step.b1) * (g - m)
        band = band * step.b2 + (1.0 - step.b2) * band_outer(g, b)
        mask = _block_mask(xp, n, b, bsz, dev)
        if mask is not None:  # pairs across a block edge are not in the graph: held at zero
            band = xp.where(mask, band, xp.zeros_like(band))
        hhat = band / bc2
        mhat = m / bc1
        if not step.relative_eps:
            eps_eff = step.eps
        elif blocked:
            eps_eff = step.eps_effective(
                xp, _per_entry(xp, _block_max(xp, band_rowsums(hhat), bsz), n, bsz, dev))
        else:
            eps_eff = step.eps_effective(xp, band_rowsum_max(hhat))
        vhat = hhat[:, 0]
        h = xp.concat([xp.reshape(vhat + eps_eff, (n, 1)), hhat[:, 1:]], axis=1)
        psi, s, kept = sonew_factor_guarded(h, step.tau(band.dtype))
        u = sonew_apply(psi, s, mhat)
        if b > 0:
            j = xp.arange(n, device=dev)
            end = n_real if not blocked else xp.minimum((j // bsz + 1) * bsz, n_real)
            real = xp.clip(end - 1 - j, min=0, max=b)  # neighbours in the row's block
            kept_real = xp.minimum(kept, real)
            removed = xp.sum(real - kept_real)
            fallback = xp.sum(xp.astype(kept_real < real, xp.int64))
        else:
            removed = fallback = xp.zeros((), dtype=xp.int64, device=dev)
        new_nu = nu
        if blocked:  # each entry's block norm (arrayopt.grafting.block_norms)
            def norm(x):
                return _per_entry(xp, grafting.block_norms(xp, x, bsz), n, bsz, dev)
        else:
            def norm(x):
                return grafting.norm(xp, x)
        if step.graft == "none":
            direction = u
        else:  # graft: the norm of a first-order direction (arrayopt.grafting)
            if step.graft == "adam":
                target = norm(grafting.adam_direction(xp, mhat, vhat, step.graft_eps))
            elif step.graft == "sgd":
                target = norm(g)
            elif step.graft == "momentum":
                target = norm(mhat)
            else:  # rmsprop_normalized (ĝ = g/‖g‖ per block when block-local)
                a, new_nu = grafting.direction(xp, "rmsprop_normalized", g, nu, 0, b2=step.b2,
                                               eps=step.graft_eps, g_norm=norm(g) if blocked else None)
                target = norm(a)
            direction = u * grafting.graft_scale(xp, target, norm(u))
        if step.small_param_fallback == "adam" and small:
            direction = grafting.adam_direction(xp, mhat, vhat, step.graft_eps)
        if step.weight_decay != 0.0:
            direction = direction + step.weight_decay * p
        return -lr * direction, m, band, new_nu, removed, fallback

    def _jax_flat(self, xp, p, g, m, nu, band, step, small, n):
        """JAX: pad small vectors to a power of two (exact: the padding is a separate block of the
        preconditioner with zero gradient) and run :meth:`flat_leaf` under ``jax.jit``.

        The jitted functions are cached per (namespace, small) on the optimizer (its options
        are fixed at construction); the per-step scalars are traced arguments.
        """
        import jax

        key = (xp, small, step.band)
        fn = self._jitted.get(key)
        if fn is None:
            template = dataclasses.replace(self._template, band=step.band)

            def leaf(p, g, m, nu, band, lr, bc1, bc2, n_real):
                return SONew.flat_leaf(xp, p, g, m, nu, band, template.with_scalars(lr, bc1, bc2), small,
                                       n_real)

            with self._jit_lock:
                fn = self._jitted.setdefault(key, jax.jit(leaf))
        size = n if n > 4096 else max(8, 1 << (n - 1).bit_length())
        pad = size - n
        band_p = band
        if pad:
            def padv(x):
                return None if x is None else xp.concat([x, xp.zeros((pad,), dtype=x.dtype)])

            p, g, m, nu = (padv(x) for x in (p, g, m, nu))
            band_p = xp.concat([band, xp.zeros((pad, band.shape[1]), dtype=band.dtype)])
        u, m2, band2, nu2, removed, fallback = fn(p, g, m, nu, band_p, step.lr, step.bc1, step.bc2, n)
        if pad:
            u, m2, band2 = u[:n], m2[:n], band2[:n]
            nu2 = None if nu2 is None else nu2[:n]
        return u, m2, band2, nu2, removed, fallback

    def _reference_all(self, ns, leaves, g_leaves, state, step=None):
        """The reference on every leaf: ``(updates, new_state)``. ``step``: the step description
        (default: :meth:`step_description` of ``state["count"]``; a traced one when the step is
        traced into a caller's ``jax.jit``, the count then being a traced array)."""
        xp = ns.xp
        if step is None:
            step = self.step_description(state["count"])
        jit = ns.library == "jax"
        out = {"updates": [], "mu": [], "band": [], "graft_nu": [], "removed_edges": [], "fallback_rows": []}
        leaf_fn = self.reference_leaf
        for i, (p, g) in enumerate(zip(leaves, g_leaves)):
            low = is_low_precision(p.dtype)
            p32 = xp.astype(p, xp.float32) if low else p
            g32 = xp.astype(g, xp.float32) if low else g
            nu = state["graft_nu"][i] if "graft_nu" in state else None
            u, m, band, nu, removed, fallback = leaf_fn(
                xp, p32, g32, state["mu"][i], state["band"][i], nu, step, jit)
            out["updates"].append(u)
            out["mu"].append(m)
            out["band"].append(band)
            out["graft_nu"].append(nu)
            out["removed_edges"].append(state["removed_edges"][i] + removed)
            out["fallback_rows"].append(state["fallback_rows"][i] + fallback)
        new = dict(state)
        new["count"] = state["count"] + 1
        for k in ("mu", "band", "removed_edges", "fallback_rows") + (("graft_nu",) if "graft_nu" in state else ()):
            new[k] = out[k]
        if ns.library == "numpy":
            import numpy as np

            for k in ("mu", "band", "removed_edges", "fallback_rows", "graft_nu"):
                if k in new:
                    new[k] = [np.asarray(x) for x in new[k]]
            out["updates"] = [np.asarray(u) for u in out["updates"]]
        return out["updates"], new

    def _update(self, ns, leaves, g_leaves, state, paths):
        xp = ns.xp
        updates, new = self._reference_all(ns, leaves, g_leaves, state)
        updates = [xp.astype(u, p.dtype) if is_low_precision(p.dtype) else u for u, p in zip(updates, leaves)]
        return updates, new

    _step = Optimizer._fused_step

    def _reference_step(self, ns, leaves, g_leaves, state, paths):
        xp = ns.xp
        updates, new = self._reference_all(ns, leaves, g_leaves, state)
        new_params = []
        for p, u in zip(leaves, updates):
            if is_low_precision(p.dtype):
                new_params.append(xp.astype(xp.astype(p, xp.float32) + u, p.dtype))
            else:
                new_params.append(p + u)
        return new_params, new

    def _run_kernel(self, backend, step, views, plan, ns, leaves, g_leaves, state, paths):
        """The fused step in place; the per-leaf counts it returns are added to the state's counters."""
        xp = ns.xp
        groups = [state["mu"], state["band"]] + ([state["graft_nu"]] if "graft_nu" in state else [])
        counts = backend.run(self.kernel_op, leaves, g_leaves, groups, step, g_views=views)
        new = dict(state)
        new["count"] = state["count"] + 1
        for k, name in enumerate(("removed_edges", "fallback_rows")):  # a counter that did not move is kept
            new[name] = [old if c[k] == 0 else xp.asarray(_to_ints([old])[0] + c[k], dtype=xp.int64, device=ns.device)
                         for old, c in zip(state[name], counts)]
        return new


class _ShapeOnly:
    def __init__(self, shape):
        self.shape = shape


def _ns_of(arg, path, a):
    from .._validate import _leaf_namespace

    return _leaf_namespace(arg, path, a)


def _dev(x):
    from .._xp import device_of

    return device_of(x)


def _to_ints(arrs):
    import numpy as np

    return [int(np.asarray(a)) if type(a).__module__.startswith("numpy") else int(a) for a in arrs]


def sonew(learning_rate=1e-3, band=1, b1=0.9, b2=0.999, eps=1e-6, graft="adam", weight_decay=0.0, *,
          graft_eps=1e-8, relative_eps=True, eps_min=1e-30, tau_factor=4.0, flatten_order="fan_in",
          block_size=DEFAULT_BLOCK_SIZE, small_param_fallback="sonew", on_nonfinite="raise"):
    """SONew (``band=0`` diagonal, ``1`` tridiagonal, ``b`` banded); see :class:`SONew`."""
    return SONew(learning_rate, band, b1, b2, eps, graft, weight_decay, graft_eps=graft_eps,
                 relative_eps=relative_eps, eps_min=eps_min, tau_factor=tau_factor,
                 flatten_order=flatten_order, block_size=block_size,
                 small_param_fallback=small_param_fallback, on_nonfinite=on_nonfinite)
