r"""Shampoo: blocked Kronecker preconditioning with exact inverse roots and grafting.

Per parameter ``W`` (merged small dims, large dims cut into blocks) and step
``t`` (1-based), with gradient ``g``:

.. math::
    F^{(j)}_b \leftarrow β_2 F^{(j)}_b + w\,G_b^{(j)} G_b^{(j)\top} \qquad\text{(every block } b\text{, axis } j)

    R^{(j)}_b = (F^{(j)}_b + ε λ_{\max} I)^{-1/p},\quad p = 2k \text{ (or exponent\_override)}
    \qquad\text{every } F \text{ steps from } t_0

    d = \operatorname{merge}_b\big(G_b \times_1 R^{(1)}_b \cdots \times_k R^{(k)}_b\big),\qquad
    u = \frac{\lVert u_g\rVert_F}{\lVert d\rVert_F}\, d \quad\text{(layer-wise grafting)}

    m \leftarrow β_1 m + w_1 u;\quad v = w_1 u + β_1 m \ \text{(Nesterov) or } m;\quad
    W \leftarrow W - η_t (v + λ W)

With ``preconditioner="eigenvalue_corrected"`` (EKFAC/SOAP) only the
eigenbases ``Q^{(j)}_b`` of the factors are refreshed (exact eigh, or QR
iterations warm-started from the previous basis with ``root_method="qr"``) and
each block's direction is

.. math::
    Ĝ = G_b \times_j Q^{(j)\top}_b,\quad D_b \leftarrow β D_b + (1-β) Ĝ^{∘2},\quad
    d_b = \big(Ĝ / (\sqrt{D_b/(1-β^t)} + ε)\big) \times_j Q^{(j)}_b

(``β = eigen_b2``, default ``b2``; math in ``docs/shampoo.md``, Q1–Q6),
with ``u_g`` the grafted first-order direction (:class:`GraftingConfig`), used
alone (``u = u_g``) before the first roots are installed (``t < t_0``, or while
the first asynchronous roots are in flight) and for skipped parameters
(scalars, any dim above ``skip_preconditioning_dim_size_gt``). ``w = 1`` if
``β₂ = 1`` (AdaGrad-style sum) else ``1 - β₂``; ``w_1 = 1 - β₁`` if
``ema_momentum`` else 1. Weight decay is decoupled (AdamW style).

Roots are computed on the host in float64 by default (``root_dtype``), every
``precondition_every`` steps from ``start_preconditioning_step``, and installed
``root_delay`` steps later (0 without an executor; 1 with one, so a job runs
while the next step's caller computes gradients). ``executor=`` any
``concurrent.futures.Executor`` runs them asynchronously; ``comm=`` spreads them
over data-parallel ranks (:mod:`arrayopt.shampoo.distributed`).

>>> import numpy as np, arrayopt as ao
>>> opt = ao.shampoo(learning_rate=0.1, block_size=128)
>>> params = {"w": np.ones((4, 3), np.float32)}
>>> state = opt.init(params)
>>> params, state = opt.step(params, {"w": np.full((4, 3), 0.5, np.float32)}, state)
>>> state["count"], state["roots_step"]
(1, 1)
"""

from __future__ import annotations

import threading

import numpy as np

from .. import _validate, dispatch
from .._xp import dtype_name, is_low_precision, state_dtype, to_numpy
from .._overflow import gradients_in_range
from ..base import Optimizer, apply_leaf, write_params
from .async_roots import RootJob, job_result, owners, run_root_job
from ..linalg.host_lapack import lapack_for
from .blocking import LeafPlan, plan_leaf
from .config import ShampooConfig
from .state_check import check_state
from .distributed import as_comm
from .. import grafting
from .math import corrected_moment
from .step import corrected_moment_step
from ..sketchy.step import SketchyStep, tail_groups, tail_step
from . import tree_step
from .batched import TreePlan, group_blocks

__all__ = ["Shampoo", "ShampooState"]

_COUNTERS = ("roots_step", "root_staleness", "root_jobs", "root_failures", "root_fallbacks")
#: with eigenbases: refreshes whose skip criterion held (basis kept)
_BASIS_COUNTERS = ("refresh_skips",)


#: what :meth:`Shampoo._fused_tail` returns for a step rejected (and skipped) after its moments were written
REJECTED = object()


class ShampooState(dict):
    """Shampoo's state: a plain dict of arrays, lists and scalars, plus a pending root job.

    ``settle()`` waits for an in-flight asynchronous root job and stores its
    result in ``state["pending"]["result"]`` (``ao.save_state`` calls it).
    """

    _future = None

    def settle(self) -> None:
        if self._future is not None:
            res = job_result(self._future, self["pending"]["stats_step"])
            self["pending"] = {**self["pending"], "result": res}
            self._future = None

    def _carry(self, new: dict) -> "ShampooState":
        out = ShampooState(new)
        out._future = self._future if isinstance(self, ShampooState) else None
        return out


class Shampoo(Optimizer):
    """Shampoo with blocking, grafting, infrequent/asynchronous/distributed roots; see the module doc."""

    name = "shampoo"

    def __init__(self, config: ShampooConfig, *, executor=None, comm=None, on_nonfinite="raise"):
        super().__init__(on_nonfinite=on_nonfinite)
        if not isinstance(config, ShampooConfig):
            raise TypeError(f"config: expected a ShampooConfig, got {type(config).__name__}")
        if executor is not None and not callable(getattr(executor, "submit", None)):
            raise TypeError(f"executor: expected a concurrent.futures.Executor (with submit()), "
                            f"got {type(executor).__name__}")
        self.config = config
        self.executor = executor
        self.comm = as_comm(comm)
        self.delay = config.delay(executor is not None)
        self._init_transient()
        self.hyperparams = {k: getattr(config, k) for k in config.__dataclass_fields__}

    _TRANSIENT = ("_plans", "_tree_plans", "_plans_lock", "_layouts")

    @property
    def _counters(self) -> tuple:
        return _COUNTERS + (_BASIS_COUNTERS if self.config.uses_bases else ())

    @property
    def _factor_trees(self) -> tuple:
        """State entries holding one matrix per factor."""
        return ("stats",) + (() if self.config.eigenvalue_corrected else ("roots",)) + \
            (("bases",) if self.config.uses_bases else ())

    def _init_transient(self):
        # shape -> LeafPlan (a pure function of the shape and the config), filled under the lock
        object.__setattr__(self, "_plans", {})
        # tuple of leaf shapes -> TreePlan (the block groups of a tree), filled under the same lock
        object.__setattr__(self, "_tree_plans", {})
        object.__setattr__(self, "_plans_lock", threading.Lock())
        # (id of a LeafPlan kept in _plans, corrected) -> its factor layout (_layout)
        object.__setattr__(self, "_layouts", {})

    # ---------------------------------------------------------------- layout

    def plan(self, shape) -> LeafPlan:
        plan = self._plans.get(shape)  # NumPy, torch and JAX shapes hash as tuples of ints
        if plan is not None:
            return plan
        key = tuple(int(d) for d in shape)
        plan = self._plans.get(key)
        if plan is None:
            with self._plans_lock:
                plan = self._plans.setdefault(key, plan_leaf(key, self.config))
        return plan

    def tree_plan(self, plans) -> TreePlan:
        """The block groups (:func:`~arrayopt.shampoo.batched.group_blocks`) of a tree's leaf plans."""
        key = tuple((p.skipped, p.shape, p.blocks) for p in plans)
        tp = self._tree_plans.get(key)
        if tp is None:
            with self._plans_lock:
                tp = self._tree_plans.setdefault(key, group_blocks(plans))
        return tp

    def _init(self, ns, leaves):
        xp, cfg = ns.xp, self.config
        self.tree_plan([self.plan(p.shape) for p in leaves])  # the groups, made once per tree

        def per_factor(make):
            return [[[make(s, state_dtype(xp, p.dtype)) for s in blk] for blk in self.plan(p.shape).factor_shapes()]
                    for p in leaves]

        out: dict = {"stats": per_factor(lambda s, dt: xp.zeros(s, dtype=dt, device=ns.device))}
        if not cfg.eigenvalue_corrected:
            out["roots"] = per_factor(lambda s, dt: xp.eye(s[0], dtype=dt, device=ns.device))
        if cfg.uses_bases:
            out["bases"] = per_factor(lambda s, dt: xp.eye(s[0], dtype=dt, device=ns.device))
        if cfg.eigenvalue_corrected:
            out["second_moment"] = [[xp.zeros(s, dtype=state_dtype(xp, p.dtype), device=ns.device)
                                     for s in self.plan(p.shape).block_shapes()] for p in leaves]
        if cfg.graft.has_state:
            out["graft"] = [xp.zeros(p.shape, dtype=state_dtype(xp, p.dtype), device=ns.device) for p in leaves]
        if cfg.b1 > 0:
            out["momentum"] = [xp.zeros(p.shape, dtype=state_dtype(xp, p.dtype), device=ns.device)
                               for p in leaves]
        out.update({k: (-1 if k == "root_staleness" else 0) for k in self._counters})
        out["pending"] = None
        return out

    def init(self, params):
        return ShampooState(super().init(params))

    # ---------------------------------------------------------------- validation

    def _check_state(self, ns, leaves, paths, state, params_missing):
        check_state(self, ns, leaves, paths, state, params_missing)

    def _skipped_state(self, state):
        new = super()._skipped_state(state)
        return state._carry(new) if isinstance(state, ShampooState) else ShampooState(new)

    # ---------------------------------------------------------------- roots

    def _is_root_step(self, t: int) -> bool:
        cfg = self.config
        return t >= cfg.start_preconditioning_step and (t - cfg.start_preconditioning_step) % cfg.precondition_every == 0

    def _flat_factors(self, stats):
        return [f for per_leaf in stats for blk in per_leaf for f in blk]

    def _exponents(self, leaves):
        out = []
        for p in leaves:
            plan = self.plan(p.shape)
            out += [plan.exponent] * sum(len(b) for b in plan.factor_shapes())
        return out

    def _make_job(self, ns, leaves, stats, bases, warm, out_dtype):
        cfg = self.config
        flat = self._flat_factors(stats)
        expo = self._exponents(leaves)
        own = owners([tuple(f.shape) for f in flat], self.comm.size)
        idx = [i for i, r in enumerate(own) if r == self.comm.rank]
        mats = [np.array(to_numpy(flat[i]), copy=True) for i in idx]
        prev = None
        if warm and cfg.root_method == "qr":
            flat_b = self._flat_factors(bases)
            prev = [np.array(to_numpy(flat_b[i]), copy=True) for i in idx]
        return RootJob(mats, [expo[i] for i in idx], idx, len(flat), own, self.comm.rank,
                       eps=cfg.eps, relative=cfg.relative_epsilon, method=cfg.root_method,
                       compute_dtype=cfg.root_dtype, threshold=cfg.inverse_failure_threshold,
                       out_dtype=out_dtype, ridge_retries=cfg.ridge_retries, preconditioner=cfg.preconditioner,
                       prev=prev, qr_iterations=cfg.qr_iterations, qr_tolerance=cfg.qr_tolerance,
                       lapack=lapack_for(ns.library))

    def _replace(self, ns, tree, flat_new):
        """``tree`` (per leaf, per block, per factor) with the new host matrices (``None``: keep the old)."""
        out, i = [], 0
        for per_leaf in tree:
            leaf_out = []
            for blk in per_leaf:
                blk_out = []
                for old in blk:
                    h = flat_new[i]
                    blk_out.append(old if h is None else _from_host(ns, h, old))
                    i += 1
                leaf_out.append(blk_out)
            out.append(leaf_out)
        return out

    def _permute_moments(self, ns, leaves, second_moment, perms):
        """Reorder the eigenbasis second moment along the axes whose basis columns were reordered."""
        xp = ns.xp
        out, i = [], 0
        for p, per_leaf in zip(leaves, second_moment):
            mask = self.plan(p.shape).mask
            axes = [a for a, m in enumerate(mask) if m]
            leaf_out = []
            for dmat in per_leaf:
                for a in axes:
                    if perms[i] is not None:
                        dmat = xp.take(dmat, xp.asarray(perms[i], device=ns.device), axis=a)
                    i += 1
                leaf_out.append(dmat)
            out.append(leaf_out)
        return out

    def _install(self, ns, leaves, trees, result, counters, stats_step):
        """New ``trees`` (roots/bases/second moment) with the job's results (failed factors keep theirs)."""
        trees = dict(trees)
        tree_plan = self.tree_plan([self.plan(p.shape) for p in leaves])
        for k in ("roots", "bases"):
            if k in trees and k in result:
                # one stack per group, kept as views: every step until the next install reads it as is
                trees[k] = tree_step.restack(ns.xp, tree_plan, self._replace(ns, trees[k], result[k]))
        if "second_moment" in trees and any(p is not None for p in result["perms"]):
            trees["second_moment"] = self._permute_moments(ns, leaves, trees["second_moment"], result["perms"])
        counters["roots_step"] = stats_step
        counters["root_failures"] += int(result["failures"])
        counters["root_fallbacks"] += int(result["fallbacks"])
        if "refresh_skips" in counters:
            counters["refresh_skips"] += int(result["skips"])
        return trees

    # ---------------------------------------------------------------- backend contract

    @property
    def kernel_op(self) -> str:
        """``"shampoo_corrected"`` (the eigenbasis moment and scaled step) with eigenvalue correction;
        else ``"sketchy"``, the step after the preconditioned direction (graft, momentum, weight
        decay, param write), which root-inverse Shampoo shares with Sketchy."""
        return "shampoo_corrected" if self.config.eigenvalue_corrected else "sketchy"

    def step_description(self, count: int):
        """Step ``count + 1``: the :class:`~arrayopt.shampoo.step.CorrectedMomentStep` with eigenvalue
        correction, else the tail's (:meth:`tail_description`)."""
        cfg = self.config
        if cfg.eigenvalue_corrected:
            return corrected_moment_step(cfg.corrected_b2, count + 1, cfg.eps)
        return self.tail_description(count)

    def tail_description(self, count: int) -> SketchyStep:
        """The :class:`~arrayopt.sketchy.step.SketchyStep` of step ``count + 1``'s tail (the backend's
        ``sketchy`` op, after the directions, with either preconditioner)."""
        return tail_step(self.config, count)

    def _tail_groups(self, leaves, g_leaves, state):
        """The arrays the tail writes or reads per leaf: params, grads, graft accumulators, momentum."""
        return tail_groups(self.config, leaves, g_leaves, state)

    def _kernel_groups(self, leaves, g_leaves, state):
        # eigenvalue correction: the second moments are block-shaped, each block's (Ĝ, D) pair is
        # checked where it is fused
        return (leaves, g_leaves) if self.config.eigenvalue_corrected else self._tail_groups(leaves, g_leaves, state)

    def _graft_per_block(self, leaves) -> bool:
        """Whether a preconditioned leaf of several blocks takes one graft norm per block (the tail
        kernel takes one norm per leaf: such a step runs the reference tail)."""
        g = self.config.graft
        if g.type == "none" or g.per != "block":
            return False
        return any(not pl.skipped and len(pl.blocks) > 1 for pl in (self.plan(p.shape) for p in leaves))

    def _step(self, ns, leaves, g_leaves, state, paths):
        """Root-inverse: the fused template (:meth:`_run_kernel`; the reference where no backend takes
        the tail). Eigenvalue correction: :meth:`_corrected_step`."""
        if self.config.eigenvalue_corrected:
            return self._corrected_step(ns, leaves, g_leaves, state, paths)
        if self._graft_per_block(leaves):
            return Optimizer._step(self, ns, leaves, g_leaves, state, paths)
        return Optimizer._fused_step(self, ns, leaves, g_leaves, state, paths)

    def _corrected_step(self, ns, leaves, g_leaves, state, paths):
        """The eigenvalue-corrected step: the eigenbasis moments fused where a backend takes them
        (updated in place: the state is consumed), then the backend's tail (:meth:`_fused_tail`)
        where one takes it; else the reference, then the params written."""
        if not _validate.all_finite(ns.xp, g_leaves):
            self._handle_nonfinite(ns.xp, g_leaves, paths)
            return None
        moment = None
        backend = self._choose(ns, self.step_description(state["count"]), leaves, g_leaves, state).backend
        # the kernels update state in place: only for gradients far from overflow
        views = backend.views(g_leaves) if backend is not None else None
        if backend is not None and gradients_in_range(views):
            op = self.kernel_op

            def moment(gh, d, step):
                # a block the kernel cannot take in place (layout, dtype, read-only D): the reference
                if gh.dtype != d.dtype or backend.refuse_arrays(ns, [gh], [gh], [d]) is not None:
                    return corrected_moment(ns.xp, gh, d, step)
                return backend.run(op, [gh], [], [[d]], step)[0], d

            if not self._graft_per_block(leaves):
                step = self.tail_description(state["count"])
                tail = dispatch.choose("sketchy", ns, step, *self._tail_groups(leaves, g_leaves, state)).backend
                if tail is backend:
                    new_state = self._fused_tail(backend, step, views, ns, leaves, g_leaves, state, paths, moment)
                    if new_state is REJECTED:
                        return None
                    return list(leaves), new_state
        updates, new_state = self._update(ns, leaves, g_leaves, state, paths, moment=moment)
        new = [apply_leaf(ns.xp, p, u) for p, u in zip(leaves, updates)]
        if not self._finite_update(ns, new, paths):  # nothing written (but fused second moments)
            return None
        return write_params(ns, leaves, new), new_state

    # ---------------------------------------------------------------- the step

    def _prepare(self, ns, leaves, g_leaves, state) -> dict:
        """Steps 1-3 of :meth:`_update`: roots installed when due, the statistics updated, a root job
        run or queued; returns what the directions and the tail need (nothing is written)."""
        xp, cfg = ns.xp, self.config
        t = state["count"] + 1
        counters = {k: state[k] for k in self._counters}
        trees = {k: state[k] for k in ("roots", "bases", "second_moment") if k in state}
        pending = state["pending"]
        future = getattr(state, "_future", None)
        # 1. install roots that are due (waits for an in-flight job)
        if pending is not None and (pending["install_at"] <= t or self._is_root_step(t)):
            result = pending["result"] if pending["result"] is not None else job_result(future, pending["stats_step"])
            trees = self._install(ns, leaves, trees, result, counters, pending["stats_step"])
            pending, future = None, None
        # 2. statistics (raw gradient, state dtype), one batched update per group of equal blocks
        g32 = [xp.astype(g, xp.float32) if is_low_precision(g.dtype) else g for g in g_leaves]
        plans = [self.plan(p.shape) for p in leaves]
        tree_plan = self.tree_plan(plans)
        g_blocks = tree_step.block_gradients(xp, plans, g32)
        stats = state["stats"] if t % cfg.statistics_every != 0 else \
            tree_step.statistics(xp, tree_plan, g_blocks, state["stats"], cfg.b2)
        # 3. roots of this step's statistics: now, or installed root_delay steps later
        if self._is_root_step(t) and len(self._flat_factors(stats)) > 0:
            out_dtype = dtype_name(state_dtype(xp, leaves[0].dtype))
            job = self._make_job(ns, leaves, stats, trees.get("bases"), counters["roots_step"] > 0, out_dtype)
            counters["root_jobs"] += 1
            if self.delay == 0:
                res = run_root_job(job, self.comm) if self.executor is None else \
                    job_result(self.executor.submit(run_root_job, job, self.comm), t)
                trees = self._install(ns, leaves, trees, res, counters, t)
            elif self.executor is None:
                pending = {"install_at": t + self.delay, "stats_step": t, "result": run_root_job(job, self.comm)}
            else:
                future = self.executor.submit(run_root_job, job, self.comm)
                pending = {"install_at": t + self.delay, "stats_step": t, "result": None}
        active = counters["roots_step"] > 0
        counters["root_staleness"] = t - counters["roots_step"] if active else -1
        return {"t": t, "counters": counters, "trees": trees, "pending": pending, "future": future, "g32": g32,
                "plans": plans, "tree_plan": tree_plan, "g_blocks": g_blocks, "stats": stats, "active": active}

    def _new_state(self, ns, state, c, new_graft, new_mom, new_moments=None):
        """The state after step ``c["t"]`` (``c``: :meth:`_prepare`'s context)."""
        cfg = self.config
        new = dict(state)
        new["count"] = c["t"]
        new["stats"] = c["stats"]
        new.update(c["trees"])
        if cfg.eigenvalue_corrected:  # (NumPy turns 0-d results into scalars)
            new["second_moment"] = [[np.asarray(a) for a in m] for m in new_moments] \
                if ns.library == "numpy" else new_moments
        if cfg.graft.has_state:
            new["graft"] = new_graft
        if cfg.b1 > 0:
            new["momentum"] = new_mom
        new.update(c["counters"])
        new["pending"] = c["pending"]
        out = ShampooState(new)
        out._future = c["future"]
        return out

    def _run_kernel(self, backend, step, views, plan, ns, leaves, g_leaves, state, paths):
        """Root-inverse Shampoo in the fused template: :meth:`_fused_tail`."""
        return self._fused_tail(backend, step, views, ns, leaves, g_leaves, state, paths)

    def _fused_tail(self, backend, step, views, ns, leaves, g_leaves, state, paths, moment=None):
        """Statistics, roots and the directions ``d`` through the namespace (:meth:`_prepare`; with
        eigenvalue correction, the eigenbasis moments by ``moment``), then per leaf the graft,
        momentum, weight decay and the param write in place, in one norms pass and one write pass
        (the backend's ``sketchy`` op: the same step after a preconditioned direction). ``None``
        (no param, graft accumulator or momentum written; the reference runs) when a direction is
        not finite; with eigenvalue correction, whose moments are then already updated, the
        update is reported at once (raised, or :data:`REJECTED` for a skipped step)."""
        cfg = self.config
        c = self._prepare(ns, leaves, g_leaves, state)
        directions = [None] * len(leaves)
        d_stacks, new_moments = self._directions(ns, c, moment)
        if c["active"]:
            directions = tree_step.merged_directions(ns.xp, c["tree_plan"], c["plans"], d_stacks,
                                                     [tuple(p.shape) for p in leaves], cfg.block_size)
            ds = [d for d in directions if d is not None]
            if ds and not _validate.all_finite(ns.xp, ds):
                if not cfg.eigenvalue_corrected:
                    return None  # nothing written: the reference runs, and reports the update
                # the moments were updated in place (as in the reference step): the update is reported
                # here, params, graft accumulators and momentum unwritten
                self._finite_update(ns, ds, [q for q, d in zip(paths, directions) if d is not None])
                return REJECTED
        accs = state["graft"] if cfg.graft.has_state else None
        moms = state["momentum"] if cfg.b1 > 0 else None
        backend.run("sketchy", leaves, g_leaves, [accs, moms, directions], step, g_views=views)
        return self._new_state(ns, state, c, list(accs) if accs is not None else None,
                               list(moms) if moms is not None else None, new_moments)

    def _directions(self, ns, c, moment=None):
        """``(d_stacks, new second moments)`` of step ``c`` (:meth:`_prepare`): the directions by group
        once roots are active, and with eigenvalue correction the moments from step 1 (by
        ``moment``, a backend's kernel, where given); ``None`` for what this step has not."""
        cfg = self.config
        if not (cfg.eigenvalue_corrected or c["active"]):
            return None, None
        moment_step = corrected_moment_step(cfg.corrected_b2, c["t"], cfg.eps) if cfg.eigenvalue_corrected else None
        d_stacks, moments = tree_step.directions(ns.xp, c["tree_plan"], c["g_blocks"], c["trees"],
                                                 corrected=cfg.eigenvalue_corrected, moment_step=moment_step,
                                                 moment=moment)
        return d_stacks, moments if cfg.eigenvalue_corrected else None

    def _update(self, ns, leaves, g_leaves, state, paths, moment=None):
        """The step (pure array-API); ``moment``: a backend's fused eigenbasis-moment kernel
        (:meth:`_step`), which may write the second moments in place."""
        xp, cfg = ns.xp, self.config
        lr = _validate.learning_rate_at(cfg.learning_rate, state["count"])
        c = self._prepare(ns, leaves, g_leaves, state)
        t, active, g32, plans, tree_plan = c["t"], c["active"], c["g32"], c["plans"], c["tree_plan"]
        b1 = cfg.b1
        # 4. directions by group; graft direction, grafting, momentum, decay (small leaves in one pass)
        dtypes = [state_dtype(xp, p.dtype) for p in leaves]
        kind = "sgd" if cfg.graft.type == "none" else cfg.graft.type
        runs = tree_step.runs_for(xp, leaves, dtypes, kind)

        def graft_dir(g, acc):
            return grafting.direction(xp, kind, g, acc, t, b2=cfg.graft.b2, eps=cfg.graft.eps)

        u_g, new_graft = tree_step.tail(xp, runs, leaves, [g32, state["graft"] if cfg.graft.has_state else None],
                                        graft_dir)
        d_stacks, new_moments = self._directions(ns, c, moment)
        if active:
            u_pre = tree_step.graft_groups(xp, tree_plan, plans, d_stacks, u_g, cfg)
        u = [u_g[i] if plan.skipped or not active else tree_step.reshape(xp, u_pre[i], tuple(p.shape))
             for i, (p, plan) in enumerate(zip(leaves, plans))]
        p32 = tree_step.low_precision_params(xp, leaves, cfg)
        upd, new_mom = tree_step.tail(xp, runs, leaves, [u, state["momentum"] if b1 > 0 else None, p32],
                                      tree_step.momentum_update(xp, cfg, lr))
        updates = [xp.astype(x, p.dtype) if is_low_precision(p.dtype) else x for x, p in zip(upd, leaves)]
        if ns.library == "numpy":  # NumPy turns 0-d results into scalars
            updates = [np.asarray(u) for u in updates]
            new_graft = [np.asarray(a) for a in new_graft]
            new_mom = [np.asarray(a) for a in new_mom]
        return updates, self._new_state(ns, state, c, new_graft, new_mom, new_moments)


def _from_host(ns, h: np.ndarray, like):
    """A host root as an array of ``like``'s namespace, device and dtype."""
    if ns.library == "numpy":
        return h if h.dtype == like.dtype else h.astype(like.dtype)
    if ns.library == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(h)).to(device=like.device, dtype=like.dtype)
    out = ns.xp.asarray(h, device=ns.device)
    return out if out.dtype == like.dtype else ns.xp.astype(out, like.dtype)
