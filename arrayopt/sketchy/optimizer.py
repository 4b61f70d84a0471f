r"""Sketchy: S-AdaGrad (order 1) and per-axis S-Shampoo (order k) with Frequent-Directions sketches.

Feinberg, Chen, Sun, Anil, Hazan, "Sketchy: Memory-efficient Adaptive
Regularization with Frequent Directions", NeurIPS 2023 (arXiv:2302.03764).
Per parameter ``W`` (small dims merged, unit dims dropped) of order ``k`` and
step ``t`` (1-based), gradient ``G``, for every axis ``i`` with unfolding
``G_(i)`` (``d_i × ∏_{j≠i} d_j``) and sketch rank ``k_i = min(d_i, rank)``:

.. math::
    (U_i, σ̄_i, ρ_i) \leftarrow \operatorname{FD}(U_i, σ̄_i, ρ_i;\ G_{(i)};\ β_2)
    \qquad(t = 1, 1 + f, 1 + 2f, \dots;\ f = \text{update\_every})

    D = G \times_1 (G̃_1 + ε_a I)^{-1/(2k)} \cdots \times_k (G̃_k + ε_a I)^{-1/(2k)},
    \qquad G̃_i = U_i\operatorname{diag}(μ_i)U_i^\top + ρ_i (I - U_iU_i^\top)

    u = \frac{\lVert u_g\rVert_F}{\lVert D\rVert_F} D,\quad
    m \leftarrow β_1 m + w_1 u,\quad W \leftarrow W - η_t(v + λW)

(FD and the low-rank inverse power: :mod:`arrayopt.sketchy.math`; ``ε_a = ε·max μ_i``
with ``relative_eps``). An order-1 parameter is S-AdaGrad (exponent ``-1/2``); a
matrix gets ``L̃^{-1/4} G R̃^{-1/4}``. ``u_g`` is the grafted first-order direction
(:mod:`arrayopt.grafting`), used alone before ``start_preconditioning_step`` and
for parameters with a dim above ``skip_preconditioning_dim_size_gt`` or an order
below ``skip_preconditioning_rank_lt``; momentum and weight decay are
:mod:`arrayopt.momentum`'s (as Shampoo's).

State per preconditioned axis (tearfree's layout): ``eigvecs`` (``d_i × k_i``),
``sv`` and ``inv_eigvals`` (``k_i``), ``tail`` and ``inv_tail`` (1 each): for an
``m × n`` float32 weight ``4·(k(m+n) + 4k + 4)`` bytes, plus the graft
accumulator and the momentum (``m·n`` each). A sketch update whose result is not
finite keeps the old sketch and is counted in ``state["sketch_skipped"]``.

>>> import numpy as np, arrayopt as ao
>>> opt = ao.sketchy(learning_rate=0.1, rank=2)
>>> params = {"w": np.ones((64, 32), np.float32)}
>>> state = opt.init(params)
>>> params, state = opt.step(params, {"w": np.full((64, 32), 0.5, np.float32)}, state)
>>> [u.shape for u in state["eigvecs"][0]]
[(64, 2), (32, 2)]
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import array_api_compat as compat
import numpy as np

from .. import _validate, grafting
from .._xp import is_low_precision, state_dtype
from ..base import Optimizer, apply_leaf
from .batched import plan_tree, precondition_groups, sketch_groups
from .math import apply_factors, fd_update, inverse_factors
from ..momentum import heavy_ball_update
from ..shampoo.blocking import merge_small_dims
from ..grafting import as_grafting
from .config import SketchyConfig
from .step import SketchyStep, check_tail_state, tail_groups, tail_keys, tail_step

__all__ = ["Sketchy", "sketchy", "SketchPlan"]

#: per-axis state entries, in tearfree's order
SKETCH_KEYS = ("eigvecs", "sv", "inv_eigvals", "tail", "inv_tail")


@dataclass(frozen=True)
class SketchPlan:
    """How one parameter is preconditioned: ``skipped`` (graft only), the merged ``shape``
    and the sketch ``ranks`` ``k_i = min(d_i, rank)`` of its axes."""

    skipped: bool
    shape: tuple
    ranks: tuple

    @property
    def alpha(self) -> float:
        return 1.0 / (2 * len(self.shape))

    def sketch_shapes(self) -> list:
        """Per axis, the shapes of :data:`SKETCH_KEYS`."""
        return [[(d, k), (k,), (k,), (1,), (1,)] for d, k in zip(self.shape, self.ranks)]


def plan_sketch(shape, cfg: SketchyConfig) -> SketchPlan:
    shape = tuple(int(d) for d in shape)
    too_big = cfg.skip_preconditioning_dim_size_gt is not None and any(
        d > cfg.skip_preconditioning_dim_size_gt for d in shape)
    merged = merge_small_dims(shape, cfg.merge_small_dims)
    if len(shape) < cfg.skip_preconditioning_rank_lt or too_big or 0 in shape or merged == (1,):
        return SketchPlan(True, shape, ())
    return SketchPlan(False, merged, tuple(min(d, cfg.rank) for d in merged))


def _unfold(xp, g, axis: int):
    """The mode-``axis`` unfolding ``G_(axis)`` (``d_axis × rest``)."""
    nd = len(g.shape)
    if axis != 0:
        g = xp.permute_dims(g, (axis,) + tuple(i for i in range(nd) if i != axis))
    return xp.reshape(g, (g.shape[0], -1))


def sketch_axis(u, sv, tail, x, *, beta2, tail_decay, alpha, eps, relative):
    """One axis: :func:`fd_update` then its inverse factors; ``(U, σ̄, ι, ρ, ι_ρ, ok)``."""
    s = fd_update(u, sv, tail, x, beta2=beta2, tail_decay=tail_decay)
    inv, inv_tail = inverse_factors(s.undeflated, s.tail, alpha=alpha, eps=eps, relative=relative, mask=s.sv > 0)
    return s.eigvecs, s.sv, inv, s.tail, inv_tail, s.ok


def leaf_update(g, acc, m, p, eigvecs, inv, inv_tail, t, lr, *, cfg, shape, precondition_on):
    """``(Δ, new graft accumulator, new momentum)`` of one leaf: graft direction, Sketchy direction
    (``precondition_on``), grafting, momentum, weight decay (one jitted function on JAX)."""
    xp = compat.array_namespace(g)
    d = None
    if precondition_on:
        d = xp.reshape(precondition(xp, xp.reshape(g, shape), list(zip(eigvecs, inv, inv_tail))), tuple(g.shape))
    return finish_leaf(xp, g, acc, m, p, d, t, lr, cfg=cfg)


def finish_leaf(xp, g, acc, m, p, d, t, lr, *, cfg):
    """``(Δ, new graft accumulator, new momentum)`` of one leaf from its Sketchy direction ``d``
    (``None``: the graft direction alone): grafting, momentum, weight decay."""
    kind = "sgd" if cfg.graft.type == "none" else cfg.graft.type
    u_g, acc = grafting.direction(xp, kind, g, acc, t, b2=cfg.graft.b2, eps=cfg.graft.eps)
    if d is not None:
        u = d if cfg.graft.type == "none" else grafting.graft(xp, d, u_g)
    else:
        u = u_g
    upd, m = heavy_ball_update(xp, u, m, p, b1=cfg.b1, ema=cfg.ema_momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, lr=lr)
    return upd, acc, m


def precondition(xp, g, axes):
    """Cyclic mode products: ``axes[i] = (U, ι, ι_ρ)`` applied to axis 0, which then moves last."""
    nd = len(g.shape)
    for u, inv, inv_tail in axes:
        shape = tuple(g.shape)
        out = apply_factors(xp, u, inv, inv_tail, xp.reshape(g, (shape[0], -1)))
        g = xp.reshape(out, shape)
        if nd > 1:
            g = xp.permute_dims(g, tuple(range(1, nd)) + (0,))
    return g


def _row_major_eigvecs(ns, per_axis):
    """``per_axis`` with every ``U`` in C order (no copy when it is). The GEMMs of the sketch
    and of the preconditioner then see one memory layout whatever made the state (a live step,
    whose SVD returns Fortran-ordered ``U`` on torch, :func:`arrayopt.load_state`, a copy), so
    a resumed run is bit-identical; JAX arrays have no layout to fix."""
    if ns.library == "torch":
        fix = lambda u: u.contiguous()  # noqa: E731
    elif ns.library == "numpy":
        fix = np.ascontiguousarray
    elif ns.library == "cupy":
        import cupy

        fix = cupy.ascontiguousarray
    else:
        return per_axis
    return [[fix(ax[0]), *ax[1:]] for ax in per_axis]


class Sketchy(Optimizer):
    """Sketchy (S-AdaGrad / S-Shampoo) with grafting, momentum and weight decay; see the module doc."""

    name = "sketchy"
    kernel_op = "sketchy"

    def __init__(self, config: SketchyConfig, *, on_nonfinite="raise"):
        super().__init__(on_nonfinite=on_nonfinite)
        if not isinstance(config, SketchyConfig):
            raise TypeError(f"config: expected a SketchyConfig, got {type(config).__name__}")
        self.config = config
        self._init_transient()
        self.hyperparams = {k: getattr(config, k) for k in config.__dataclass_fields__}

    _TRANSIENT = ("_plans", "_plans_lock", "_jitted")

    def _init_transient(self):
        # shape -> SketchPlan (a pure function of the shape and the config), filled under the lock;
        # JAX: the jitted per-axis update and preconditioner (one compilation per shape, not one per op)
        object.__setattr__(self, "_plans", {})
        object.__setattr__(self, "_plans_lock", threading.Lock())
        object.__setattr__(self, "_jitted", {})

    def _fn(self, ns, name):
        """``sketch_axis`` or the preconditioner, jitted for JAX (eager JAX compiles every op)."""
        fn = sketch_axis if name == "sketch" else leaf_update
        if ns.library != "jax":
            return fn
        jitted = self._jitted.get(name)
        if jitted is None:
            import jax

            statics = ("beta2", "tail_decay", "alpha", "eps", "relative") if name == "sketch" else \
                ("cfg", "shape", "precondition_on")
            with self._plans_lock:
                jitted = self._jitted.setdefault(name, jax.jit(fn, static_argnames=statics))
        return jitted

    def plan(self, shape) -> SketchPlan:
        key = tuple(int(d) for d in shape)
        plan = self._plans.get(key)
        if plan is None:
            with self._plans_lock:
                plan = self._plans.setdefault(key, plan_sketch(key, self.config))
        return plan

    def tree_plan(self, ns, leaves):
        """The :class:`~arrayopt.sketchy.batched.TreePlan` of these leaves (cached by shapes and dtypes)."""
        dts = tuple(str(state_dtype(ns.xp, p.dtype)) for p in leaves)
        key = ("tree", tuple(tuple(int(d) for d in p.shape) for p in leaves), dts)
        tree = self._plans.get(key)
        if tree is None:
            tree = plan_tree([self.plan(p.shape) for p in leaves], dts)
            with self._plans_lock:
                tree = self._plans.setdefault(key, tree)
        return tree

    def _directions(self, ns, leaves, g_leaves, sketches, t):
        """Per leaf, the Sketchy direction ``D`` (the leaf's shape) or ``None`` (graft step only)."""
        xp, cfg = ns.xp, self.config
        if t < cfg.start_preconditioning_step:
            return [None] * len(leaves)
        g_leaves = [xp.astype(g, xp.float32) if is_low_precision(p.dtype) else g for p, g in zip(leaves, g_leaves)]
        found = precondition_groups(xp, self.tree_plan(ns, leaves), g_leaves, sketches)
        return [found.get(i) for i in range(len(leaves))]

    def _init(self, ns, leaves):
        xp, cfg = ns.xp, self.config
        out: dict = {k: [] for k in SKETCH_KEYS}
        for p in leaves:
            dt = state_dtype(xp, p.dtype)
            per_key: list = [[] for _ in SKETCH_KEYS]
            for shapes in self.plan(p.shape).sketch_shapes():
                for j, s in enumerate(shapes):
                    per_key[j].append(xp.zeros(s, dtype=dt, device=ns.device))
            for k, v in zip(SKETCH_KEYS, per_key):
                out[k].append(v)
        if cfg.graft.has_state:
            out["graft"] = [xp.zeros(p.shape, dtype=state_dtype(xp, p.dtype), device=ns.device) for p in leaves]
        if cfg.b1 > 0:
            out["momentum"] = [xp.zeros(p.shape, dtype=state_dtype(xp, p.dtype), device=ns.device)
                               for p in leaves]
        out["sketch_skipped"] = 0
        return out

    def _check_state(self, ns, leaves, paths, state, params_missing):
        keys = list(SKETCH_KEYS) + tail_keys(self.config) + ["sketch_skipped"]
        dtypes = check_tail_state("sketchy", self.config, ns, leaves, paths, state, params_missing, keys)
        per_axis = [self.plan(p.shape).sketch_shapes() for p in leaves]  # once for every sketch key
        for j, name in enumerate(SKETCH_KEYS):
            tree = state[name]
            if not isinstance(tree, list) or len(tree) != len(leaves):
                raise ValueError(f"state[{name!r}]: expected a list of {len(leaves)} entries (one per leaf)")
            arrays, shapes, kinds, where = [], [], [], []  # the whole tree checked in one call
            for p, path, dt, per_leaf, axes in zip(leaves, paths, dtypes, tree, per_axis):
                want = [s[j] for s in axes]
                if not isinstance(per_leaf, list) or len(per_leaf) != len(want):
                    raise ValueError(f"state[{name!r}] leaf {path}: expected a list of {len(want)} arrays "
                                     f"(one per preconditioned axis of params shape {tuple(p.shape)})")
                arrays += per_leaf
                shapes += [tuple(s) for s in want]
                kinds += [dt] * len(want)
                where += [path] * len(want)
            if not _validate._fast_like(arrays, shapes, kinds, ns):
                for a, s, dt, path in zip(arrays, shapes, kinds, where):
                    _validate._check_leaf(f"state[{name!r}]", path, a, s, dt, ns, "expected")
        v = state["sketch_skipped"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"state['sketch_skipped']: expected a non-negative int, got {v!r}")

    # ---------------------------------------------------------------- the step

    def _sketch_leaf(self, ns, plan, g, per_axis):
        """New per-axis sketch arrays of one leaf (lists in :data:`SKETCH_KEYS` order) and ok flags."""
        cfg, xp = self.config, ns.xp
        fn = self._fn(ns, "sketch")
        gm = xp.reshape(g, plan.shape)
        new, oks = [], []
        for i, (u, sv, _, tail, _) in enumerate(per_axis):
            *arrays, ok = fn(u, sv, tail, _unfold(xp, gm, i), beta2=cfg.b2, tail_decay=cfg.tail_decay,
                             alpha=plan.alpha, eps=cfg.eps, relative=cfg.relative_eps)
            new.append(list(arrays))
            oks.append(ok)
        return new, oks

    def _update(self, ns, leaves, g_leaves, state, paths):
        updates, new = self._updates(ns, leaves, g_leaves, state)
        xp = ns.xp
        return [xp.astype(u, p.dtype) if is_low_precision(p.dtype) else u for p, u in zip(leaves, updates)], new

    # ---------------------------------------------------------------- backend contract

    def step_description(self, count: int) -> SketchyStep:
        """The frozen :class:`SketchyStep` of step ``count + 1`` (what backends receive)."""
        return tail_step(self.config, count)

    def _kernel_groups(self, leaves, g_leaves, state):
        return tail_groups(self.config, leaves, g_leaves, state)

    # bfloat16/float16 params: the float32 update is added in float32 and rounded once
    _step = Optimizer._fused_step

    def _reference_step(self, ns, leaves, g_leaves, state, paths):
        updates, new = self._updates(ns, leaves, g_leaves, state)
        return [apply_leaf(ns.xp, p, u) for p, u in zip(leaves, updates)], new

    def _run_kernel(self, backend, step, views, plan, ns, leaves, g_leaves, state, paths):
        """The sketches and the low-rank apply through the namespace, then the graft, momentum,
        weight decay and parameter write in place."""
        cfg = self.config
        t = state["count"] + 1
        sketches, skipped = self._new_sketches(ns, leaves, g_leaves, state)
        directions = self._directions(ns, leaves, g_leaves, sketches, t)
        accs = state["graft"] if cfg.graft.has_state else None
        moms = state["momentum"] if cfg.b1 > 0 else None
        backend.run(self.kernel_op, leaves, g_leaves, [accs, moms, directions], step, g_views=views)
        return self._new_state(state, sketches, skipped, accs, moms)

    def _new_sketches(self, ns, leaves, g_leaves, state):
        """``(per-leaf per-axis sketch arrays, 1 if an update was not finite else 0)`` of this step."""
        xp, cfg = ns.xp, self.config
        sketch_step = state["count"] % cfg.update_every == 0
        if ns.library != "jax":  # the groups' stacked updates (JAX: one jitted update per axis)
            sketches = [_row_major_eigvecs(ns, [list(a) for a in zip(*[state[k][i] for k in SKETCH_KEYS])])
                        for i in range(len(leaves))]
            oks = []
            if sketch_step:
                g_leaves = [xp.astype(g, xp.float32) if is_low_precision(p.dtype) else g
                            for p, g in zip(leaves, g_leaves)]
                oks = sketch_groups(xp, cfg, self.tree_plan(ns, leaves), g_leaves, sketches)
                sketches = [_row_major_eigvecs(ns, per_axis) for per_axis in sketches]
            skipped = 0
            if oks and not bool(xp.all(xp.concat(oks))):
                skipped = 1  # fd_update kept the old sketch of every axis whose update was not finite
            return sketches, skipped
        sketches, oks = [], []
        for i, (p, g) in enumerate(zip(leaves, g_leaves)):
            plan = self.plan(p.shape)
            g = xp.astype(g, xp.float32) if is_low_precision(p.dtype) else g
            per_axis = _row_major_eigvecs(ns, [list(a) for a in zip(*[state[k][i] for k in SKETCH_KEYS])])
            if sketch_step and not plan.skipped:
                per_axis, leaf_oks = self._sketch_leaf(ns, plan, g, per_axis)
                per_axis = _row_major_eigvecs(ns, per_axis)
                oks += leaf_oks
            sketches.append(per_axis)
        skipped = 0
        if oks and not bool(xp.all(xp.stack([xp.reshape(o, ()) for o in oks]))):
            skipped = 1  # fd_update kept the old sketch of every axis whose update was not finite
        if ns.library == "numpy":  # NumPy turns 0-d results into scalars
            sketches = [[[np.asarray(a) for a in ax] for ax in leaf] for leaf in sketches]
        return sketches, skipped

    def _new_state(self, state, sketches, skipped, new_graft, new_mom):
        new = dict(state)
        new["count"] = state["count"] + 1
        for j, k in enumerate(SKETCH_KEYS):
            new[k] = [[ax[j] for ax in leaf] for leaf in sketches]
        if self.config.graft.has_state:
            new["graft"] = list(new_graft)
        if self.config.b1 > 0:
            new["momentum"] = list(new_mom)
        new["sketch_skipped"] = state["sketch_skipped"] + skipped
        return new

    def _updates(self, ns, leaves, g_leaves, state):
        """``(updates in the state dtype, new state)``: the reference step."""
        xp, cfg = ns.xp, self.config
        t = state["count"] + 1
        lr = _validate.learning_rate_at(cfg.learning_rate, state["count"])
        sketches, skipped = self._new_sketches(ns, leaves, g_leaves, state)
        directions = self._directions(ns, leaves, g_leaves, sketches, t) if ns.library != "jax" else None
        new_graft, new_mom, updates = [], [], []
        for i, (p, g, per_axis) in enumerate(zip(leaves, g_leaves, sketches)):
            plan = self.plan(p.shape)
            low = is_low_precision(p.dtype)
            g = xp.astype(g, xp.float32) if low else g
            acc = state["graft"][i] if cfg.graft.has_state else None
            m = state["momentum"][i] if cfg.b1 > 0 else None
            p32 = (xp.astype(p, xp.float32) if low else p) if cfg.weight_decay != 0.0 else None
            on = not plan.skipped and t >= cfg.start_preconditioning_step
            if directions is not None:
                upd, acc, m = finish_leaf(xp, g, acc, m, p32, directions[i], t, lr, cfg=cfg)
            else:
                upd, acc, m = self._fn(ns, "leaf")(
                    g, acc, m, p32, [a[0] for a in per_axis], [a[2] for a in per_axis], [a[4] for a in per_axis],
                    t, lr, cfg=cfg, shape=plan.shape, precondition_on=on)
            if acc is not None:
                new_graft.append(acc)
            if cfg.b1 > 0:
                new_mom.append(m)
            updates.append(upd)
        if ns.library == "numpy":  # NumPy turns 0-d results into scalars
            updates = [np.asarray(u) for u in updates]
            new_graft = [np.asarray(a) for a in new_graft]
            new_mom = [np.asarray(a) for a in new_mom]
        return updates, self._new_state(state, sketches, skipped, new_graft, new_mom)


def sketchy(learning_rate=1e-3, rank: int = 128, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7,
            relative_eps: bool = True, tail_decay: str = "beta2", update_every: int = 1, graft: Any = "rmsprop",
            start_preconditioning_step: int = 1, weight_decay: float = 0.0, *, graft_b2: float = 0.999,
            graft_eps: float = 1e-8, nesterov: bool = True, ema_momentum: bool = False,
            merge_small_dims: int = 1024, skip_preconditioning_dim_size_gt: int | None = 4096,
            skip_preconditioning_rank_lt: int = 1, on_nonfinite: str = "raise") -> Sketchy:
    """Sketchy (see the module docstring for the math).

    Args:
      learning_rate: float or schedule ``count -> float``.
      rank: sketch rank ``k`` per axis (``min(d_i, rank)`` columns; the paper's ``ℓ = k + 1``).
      b1: momentum (heavy-ball; EMA with ``ema_momentum=True``); 0 disables it.
      b2: decay ``β₂`` of the sketched covariance (``1.0``: the running sum of S-AdaGrad's analysis).
      eps: ridge ``ε`` added to every eigenvalue, times the largest undeflated eigenvalue
        when ``relative_eps`` (scale invariant), absolute otherwise.
      tail_decay: ``"beta2"`` decays the escaped mass by ``β₂`` like the covariance (the paper's
        exponentially weighted FD, whose guarantees hold for the β₂-weighted covariance);
        ``"sqrt"`` decays it by ``√β₂`` (Google's tearfree code, a larger tail).
      update_every: the sketches take the gradient on steps ``t = 1, 1+f, 1+2f, …``
        (tearfree's ``update_freq``); every step preconditions with the latest sketches.
      graft: ``"rmsprop"`` (default, as tearfree), ``"none"``, ``"sgd"``, ``"adagrad"``,
        ``"rmsprop_normalized"``, ``"adam"``, ``"sqrt_n"`` or a ``GraftingConfig``.
      start_preconditioning_step: first step (1-based) that uses the Sketchy direction;
        earlier steps take the grafting direction (the sketches are updated from step 1).
      weight_decay: decoupled, added after momentum.
      merge_small_dims: neighbouring dims are merged while their product stays at most this;
        unit dims are dropped.
      skip_preconditioning_dim_size_gt: params with a dim above this take the graft step only.
      skip_preconditioning_rank_lt: params of lower order take the graft step only
        (``2`` is tearfree's choice for vectors; the default ``1`` runs S-AdaGrad on them).

    Defaults: ``rank=128, b2=0.999, eps=1e-7`` relative, RMSProp grafting (``β = 0.999``),
    Nesterov heavy-ball momentum 0.9, ``merge_small_dims=1024`` are tearfree's, so that
    results transfer. ``tail_decay="beta2"`` follows the paper rather than tearfree because
    only then is ``G̃ = Ḡ + ρI`` the compensated sketch of the β₂-weighted covariance that
    the regret analysis bounds.

    **Tearfree's preconditioner exactly**: ``tail_decay="sqrt", relative_eps=True`` (its
    defaults ``eps=1e-7, b2=0.999``, ``update_every`` = its ``update_freq``) gives its
    ``eigvals`` (our ``sv``), ``inv_eigvals``, ``tail``, ``inv_tail``, eigenvectors up to sign and
    the direction ``D``, to float32 rounding (``tests/test_sketchy.py``; singular values at the
    decomposition's rounding level count as 0 here, exactly 0 there);
    ``graft_eps=1e-23, skip_preconditioning_rank_lt=2`` match its grafting as well.
    """
    g = as_grafting(graft, graft_b2, graft_eps)
    cfg = SketchyConfig(
        learning_rate=learning_rate, rank=rank, b1=b1, b2=b2, eps=eps, relative_eps=relative_eps,
        tail_decay=tail_decay, update_every=update_every, start_preconditioning_step=start_preconditioning_step,
        graft=g, nesterov=nesterov, ema_momentum=ema_momentum, weight_decay=weight_decay,
        merge_small_dims=merge_small_dims, skip_preconditioning_dim_size_gt=skip_preconditioning_dim_size_gt,
        skip_preconditioning_rank_lt=skip_preconditioning_rank_lt)
    return Sketchy(cfg, on_nonfinite=on_nonfinite)
