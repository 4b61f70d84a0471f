"""The optimizer interface: ``init``, ``update``, ``step``; ``chain`` and ``apply_updates``.

An optimizer is a pair of pure functions over trees of arrays plus a fused fast
path::

    state = opt.init(params)
    updates, state = opt.update(grads, state, params)   # params_new = params + updates
    params, state = opt.step(params, grads, state)      # in place where arrays are writeable

The ``state`` passed to ``update``/``step`` is consumed: keep only the returned
one. An optimizer object is immutable after construction (setting an attribute
raises ``AttributeError``) and may be shared by threads: all mutable data lives
in the state or in per-call buffers. State is a ``dict`` of arrays, lists of arrays and Python scalars. Its
header (:data:`HEADER`): ``state["optimizer"]`` the optimizer's name,
``state["count"]`` the number of steps taken, ``state["nonfinite_skipped"]``
the number of steps skipped for non-finite gradients, ``state["param_paths"]``
the paths of the params leaves it was made for (a renamed tree is rejected; mapping
keys may come in any order), and ``state["consumed"]``, set to ``True`` on the state that a
successful ``update``/``step`` consumed, so that passing it again raises (on
the fused path its buffers were reused in place; on the reference path they
were not, so reusing it would give backend-dependent results). The mark is also
kept on the state's use token (``state["param_paths"]``, see
:mod:`arrayopt._state_use`), which shallow copies share: a ``dict(state)`` taken
before a step is refused after it, and a state stepped by two threads at once is
refused in one of them. ``arrayopt.copy_state`` makes a copy to step from later.
Torch math runs without autograd: no state array or update records a graph.

A step whose update is not finite although the gradients are (gradients too
large for the dtype) is treated as a non-finite gradient: rejected with a
``ValueError`` naming the leaf, or skipped and counted with ``on_nonfinite="skip"``.

Zero-size leaves get an empty update and keep their (empty) state. The per-leaf entries
of a state are its lists with one entry per leaf, in ``param_paths`` order.
"""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Any

from . import _tree, _validate
from ._state_use import (HEADER, _check_state_header, _check_state_paths, _copy_state,  # noqa: F401
                         _hand_over, _header, detached, no_autograd, take)
from ._fused import split_step, write_params
from ._overflow import gradients_in_range, nonfinite_update_error
from ._xp import Namespace, is_low_precision, state_dtype

__all__ = ["Optimizer", "ElementwiseOptimizer", "write_params", "HEADER"]

_ON_NONFINITE = ("raise", "skip")


class _FrozenAfterInit(type):
    """Metaclass: an instance is frozen once the outermost ``__init__`` has returned.

    It also keeps the constructor's arguments (``init_args``: ``(args, kwargs)``), from
    which ``arrayopt.interop._rebuild.rebuild`` makes a copy with some of them changed.
    """

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        object.__setattr__(obj, "init_args", (args, dict(kwargs)))
        object.__setattr__(obj, "_frozen", True)
        if isinstance(obj.__dict__.get("hyperparams"), dict):
            object.__setattr__(obj, "hyperparams", MappingProxyType(dict(obj.hyperparams)))
        return obj


class Optimizer(metaclass=_FrozenAfterInit):
    """Base class. Subclasses implement ``_init`` and ``_update`` on validated leaves.

    ``_step`` defaults to ``_update`` followed by writing the params in place.

    Immutable after construction (``AttributeError`` on assignment): caches an
    optimizer keeps (jitted functions, layouts) are filled under a lock and keyed by
    everything they depend on. A subclass with fused kernels sets ``kernel_op`` and
    implements ``step_description(count)`` (the frozen description a backend receives)
    and ``_kernel_groups`` (the arrays a backend must accept).
    """

    name: str = "optimizer"
    #: whether ``update``/``step`` take per-layer statistics (``stats=``); see :meth:`_check_stats`
    takes_stats: bool = False
    kernel_op: str = ""  # the backend op of the fused step ("": the reference only)
    #: whether each leaf's step is independent of the others', so that the leaves a backend takes
    #: run its kernel while the others take the reference (:mod:`arrayopt._fused`)
    per_leaf_dispatch: bool = False
    #: what ``ao.explain`` says when ``kernel_op`` is empty
    no_kernel_reason: str = "no fused kernel exists for this optimizer (its step is pure array-API code)"

    def __init__(self, *, on_nonfinite: str = "raise"):
        self.on_nonfinite = _validate.check_choice("on_nonfinite", on_nonfinite, _ON_NONFINITE)

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen", False):
            raise AttributeError(f"{type(self).__name__}.{name}: an optimizer is immutable after construction "
                                 f"(it may be shared by threads); make a new one with the new setting")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        if self.__dict__.get("_frozen", False):
            raise AttributeError(f"{type(self).__name__}.{name}: an optimizer is immutable after construction")
        object.__delattr__(self, name)

    # caches and their locks are rebuilt, not pickled (a lock cannot be; a cache need not be)
    _TRANSIENT: tuple = ()

    def _init_transient(self) -> None:
        """Create the attributes named in ``_TRANSIENT`` (empty caches, fresh locks)."""

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}
        if isinstance(state.get("hyperparams"), MappingProxyType):
            state["hyperparams"] = dict(state["hyperparams"])
        return state

    def __setstate__(self, state):
        state = dict(state)
        if isinstance(state.get("hyperparams"), dict):
            state["hyperparams"] = MappingProxyType(state["hyperparams"])
        self.__dict__.update(state)
        self._init_transient()

    # ---------------------------------------------------------------- backend contract

    def step_description(self, count: int):
        """The frozen description of step ``count + 1`` that a backend receives (``None``: no kernel)."""
        return None

    def _kernel_groups(self, leaves, g_leaves, state) -> tuple:
        """The arrays a backend must accept: params, grads, then the state arrays it updates."""
        return (leaves, g_leaves)

    def _choose(self, ns, step, leaves, g_leaves, state):
        """:func:`arrayopt.dispatch.choose` for this optimizer's op: ``(backend or None, reason)``."""
        from . import dispatch

        return dispatch.choose(self.kernel_op, ns, step, *self._kernel_groups(leaves, g_leaves, state))

    def _choose_leaves(self, ns, step, leaves, g_leaves, state):
        """:func:`arrayopt.dispatch.choose_leaves` for this optimizer's op: ``(backend, reason, refusals)``."""
        from . import dispatch

        return dispatch.choose_leaves(self.kernel_op, ns, step, *self._kernel_groups(leaves, g_leaves, state))

    # ---------------------------------------------------------------- public API

    def init(self, params: Any) -> dict:
        leaves, treedef, paths, ns = _validate.check_params(params)
        _validate.check_no_shared_memory(leaves, paths)
        state = _header(self.name, paths)
        with no_autograd(ns):
            state.update(self._init(ns, leaves))
        return state

    def update(self, grads: Any, state: dict, params: Any = None, *, stats: Any = None):
        """Return ``(updates, new_state)``; ``params + updates`` are the new params.

        ``stats``: per-layer statistics, for the optimizers that take them (``takes_stats``).
        """
        ns, treedef, leaves, g_leaves, paths = self._validate_call(grads, state, params)
        update_fn = self._with_stats(self._update, self._check_stats(ns, leaves, paths, stats))

        def zeros_like(p):
            return ns.xp.zeros(p.shape, dtype=p.dtype, device=ns.device)

        with take(state), no_autograd(ns):
            if not _validate.all_finite(ns.xp, g_leaves):
                self._handle_nonfinite(ns.xp, g_leaves, paths)  # raises unless on_nonfinite="skip"
                updates, new_state = None, None
            else:
                updates, new_state = self._on_nonempty(update_fn, zeros_like, ns, leaves, g_leaves, state, paths)
                if not self._finite_update(ns, updates, paths):  # raises unless on_nonfinite="skip"
                    updates = None
            if updates is None:
                return (_tree.unflatten(treedef, [zeros_like(p) for p in leaves]),
                        _hand_over(state, self._skipped_state(state)))
            return _tree.unflatten(treedef, updates), _hand_over(state, new_state)

    def step(self, params: Any, grads: Any, state: dict, *, stats: Any = None):
        """Fused step: returns ``(new_params, new_state)``, in place where the params are writeable.

        ``stats``: per-layer statistics, for the optimizers that take them (``takes_stats``).
        """
        if params is None:
            raise TypeError("params: step() needs the params")
        ns, treedef, leaves, g_leaves, paths = self._validate_call(grads, state, params)
        checked = self._check_stats(ns, leaves, paths, stats)
        with take(state), no_autograd(ns):
            if all(0 in p.shape for p in leaves):  # nothing to write: the pure path keeps the counters right
                _, new_state = self._on_nonempty(self._with_stats(self._update, checked), None, ns, leaves,
                                                 g_leaves, state, paths)
                return params, _hand_over(state, new_state)
            result = self._on_nonempty(self._with_stats(self._step, checked), lambda p: p, ns, leaves, g_leaves,
                                       state, paths)
            if result is None:  # non-finite gradient or update, skipped
                return params, _hand_over(state, self._skipped_state(state))
            new_leaves, new_state = result
            return _tree.unflatten(treedef, new_leaves), _hand_over(state, new_state)

    # ---------------------------------------------------------------- machinery

    def _check_stats(self, ns, leaves, paths, stats):
        """Check ``stats`` before anything is written; return what ``_update``/``_step`` receive as
        their ``stats`` keyword (``None``: they are called without it). Optimizers that take no
        statistics reject any."""
        if stats is not None:
            raise TypeError(f"stats: {self.name} takes no per-layer statistics (got {type(stats).__name__}); "
                            f"call it without stats=")
        return None

    @staticmethod
    def _check_stats_finite(xp, checked) -> bool:
        """Raise if checked statistics hold NaN/Inf (optimizers that take statistics override it)."""
        return True

    @staticmethod
    def _with_stats(fn, checked):
        return fn if checked is None else functools.partial(fn, stats=checked)

    def _validate_call(self, grads, state, params):
        _check_state_header(state, self.name)
        order = state.get("param_paths")  # mappings with the keys in another order match the state
        if params is None:
            leaves, treedef, paths, ns = _validate.check_params(grads, "grads", order)
            g_leaves = leaves
        else:
            leaves, treedef, paths, ns = _validate.check_params(params, order=order)
            g_leaves = _validate.check_like("grads", grads, treedef, paths, leaves, ns)
        _check_state_paths(state, paths, "params" if params is not None else "grads")
        self._check_state(ns, leaves, paths, state, params is None)
        # torch: gradients without autograd history; params kept (step writes them in place)
        g_leaves = detached(ns, g_leaves)
        return ns, treedef, detached(ns, leaves) if params is None else leaves, g_leaves, paths

    def _per_leaf_keys(self, state: dict, n_leaves: int) -> list:
        """The state entries that hold one item per params leaf: by default every list or tuple
        of ``n_leaves`` entries outside the header. Override if an optimizer keeps other lists."""
        return [k for k, v in state.items()
                if k not in HEADER and isinstance(v, (list, tuple)) and len(v) == n_leaves]

    def _on_nonempty(self, fn, fill, ns, leaves, g_leaves, state, paths):
        """``fn(ns, leaves, g_leaves, state, paths)`` on the leaves with at least one entry.

        Zero-size leaves are left out of the call (kernels and reductions never see them):
        their output is ``fill(param)`` and their per-leaf state entries are kept as they
        are. ``fn`` returns ``(per-leaf outputs, new_state)`` or ``None`` (a skipped step).
        """
        keep = [i for i, p in enumerate(leaves) if 0 not in p.shape]  # (a tuple test: no size computed)
        if len(keep) == len(leaves):
            return fn(ns, leaves, g_leaves, state, paths)
        per_leaf = self._per_leaf_keys(state, len(leaves))
        sub = _copy_state(state)
        for k in per_leaf:
            sub[k] = [state[k][i] for i in keep]
        result = fn(ns, [leaves[i] for i in keep], [g_leaves[i] for i in keep], sub, [paths[i] for i in keep])
        if result is None:
            return None
        outs, new_sub = result
        by_index = dict(zip(keep, outs))
        full_outs = [by_index[i] if i in by_index else (fill(p) if fill else None) for i, p in enumerate(leaves)]
        new_state = _copy_state(new_sub)
        for k in per_leaf:
            got = dict(zip(keep, new_sub[k]))
            merged = [got[i] if i in got else state[k][i] for i in range(len(leaves))]
            new_state[k] = type(state[k])(merged)
        return full_outs, new_state

    def _handle_nonfinite(self, xp, g_leaves, paths) -> None:
        """Raise (default) or return to let the caller skip the step."""
        if self.on_nonfinite == "raise":
            raise _validate.nonfinite_error("grads", _validate.first_nonfinite(xp, g_leaves, paths))

    def _finite_update(self, ns, arrays, paths) -> bool:
        """``True`` when ``arrays`` (the updates, or the new params before they are written) are
        finite; else raise (default) or return ``False`` to let the caller skip the step."""
        if _validate.all_finite(ns.xp, arrays):
            return True
        if self.on_nonfinite == "raise":
            raise nonfinite_update_error(_validate.first_nonfinite(ns.xp, arrays, paths))
        return False

    def _skipped_state(self, state: dict) -> dict:
        new = dict(state)
        new["nonfinite_skipped"] = state["nonfinite_skipped"] + 1
        return new

    def _step(self, ns, leaves, g_leaves, state, paths, **kw):
        """The reference step: the gradients checked, the new params computed (nothing written),
        checked, then written."""
        if not _validate.all_finite(ns.xp, g_leaves):
            self._handle_nonfinite(ns.xp, g_leaves, paths)
            return None
        new, new_state = self._reference_step(ns, leaves, g_leaves, state, paths, **kw)
        if not self._finite_update(ns, new, paths):
            return None
        return write_params(ns, leaves, new), new_state

    # ---------------------------------------------------------------- the fused-step template

    def _fused_step(self, ns, leaves, g_leaves, state, paths, **kw):
        """The fused step, written once for every optimizer with a kernel (``kernel_op``).

        With the backend :func:`arrayopt.dispatch.choose` picks for :meth:`step_description` and
        :meth:`_kernel_groups`: the finiteness pre-pass on its views (:meth:`_prepass_views`; none
        when :meth:`_range_check_finds_nonfinite`), then, if :meth:`_in_range` finds the inputs
        far from overflow, :meth:`_run_kernel` runs
        the kernel in place and collects its results into the new state. Otherwise (no backend,
        inputs out of range, a kernel that met a non-finite value before writing) the reference
        step :meth:`_step` checks the gradients, then the update, then writes. With
        ``per_leaf_dispatch`` the leaves the backend refuses take the reference alone
        (:func:`arrayopt._fused.split_step`). Returns ``(new leaves, new state)``, or ``None``
        for a skipped non-finite step."""
        step = self.step_description(state["count"])
        if self.per_leaf_dispatch:
            backend, _, refusals = self._choose_leaves(ns, step, leaves, g_leaves, state)
            if backend is not None and any(r is not None for r in refusals):
                return split_step(self, backend, step, refusals, ns, leaves, g_leaves, state, paths, **kw)
        else:
            backend = self._choose(ns, step, leaves, g_leaves, state).backend
        if backend is not None:
            views = backend.views(g_leaves)
            plan = self._kernel_plan(ns, leaves, g_leaves, state, paths, **kw)
            # a range check that reads every pre-pass view fails on NaN/Inf, and the reference step
            # then reports it: one read of the gradients instead of two
            if not self._range_check_finds_nonfinite() and not backend.all_finite(self._prepass_views(views, plan)):
                self._handle_nonfinite(ns.xp, g_leaves, paths)
                return None
            if self._in_range(ns, views, plan):
                new_state = self._run_kernel(backend, step, views, plan, ns, leaves, g_leaves, state, paths, **kw)
                if new_state is not None:
                    return list(leaves), new_state
        return Optimizer._step(self, ns, leaves, g_leaves, state, paths, **kw)

    def _reference_step(self, ns, leaves, g_leaves, state, paths, **kw):
        """``(new params, new state)`` without a kernel, on finite gradients; nothing written."""
        updates, new_state = self._update(ns, leaves, g_leaves, state, paths, **kw)
        return [apply_leaf(ns.xp, p, u) for p, u in zip(leaves, updates)], new_state

    def _kernel_plan(self, ns, leaves, g_leaves, state, paths, **kw):
        """What the kernel call needs that is decided in Python before it runs (default: nothing)."""
        return None

    def _prepass_views(self, views, plan) -> list:
        """The gradient views the backend's finiteness pre-pass reads (default: all of them)."""
        return views

    def _in_range(self, ns, views, plan) -> bool:
        """Whether the inputs are far enough from overflow for the in-place kernel, whose update is
        not checked before it is written (default: :func:`gradients_in_range`)."""
        return gradients_in_range(views)

    def _range_check_finds_nonfinite(self) -> bool:
        """Whether :meth:`_in_range` reads every view of :meth:`_prepass_views` and is false on a
        NaN/Inf (default: yes, ``‖g‖²`` of every view), so that no separate pre-pass runs."""
        return True

    def _run_kernel(self, backend, step, views, plan, ns, leaves, g_leaves, state, paths, **kw):
        """Run the fused kernel in place; return the new state (``None``: it met a non-finite value
        before anything was written, and the reference step runs instead)."""
        raise TypeError(f"{type(self).__name__} must implement _run_kernel()")  # pragma: no cover

    # subclasses
    def _init(self, ns: Namespace, leaves) -> dict:
        raise TypeError(f"{type(self).__name__} must implement _init()")  # pragma: no cover

    def _check_state(self, ns, leaves, paths, state, params_missing: bool) -> None:
        pass

    def _update(self, ns, leaves, g_leaves, state, paths):
        raise TypeError(f"{type(self).__name__} must implement _update()")  # pragma: no cover

    def __repr__(self) -> str:
        hp = getattr(self, "hyperparams", {})
        args = ", ".join(f"{k}={v!r}" for k, v in hp.items())
        return f"{type(self).__name__}({args})"


def apply_leaf(xp, p, u):
    """``p + u`` computed in the state dtype and cast back to the param dtype."""
    if is_low_precision(p.dtype):
        return xp.astype(xp.astype(p, xp.float32) + xp.astype(u, xp.float32), p.dtype)
    return p + u


class ElementwiseOptimizer(Optimizer):
    """An optimizer whose state is a few arrays per leaf, each the shape of its param.

    Subclasses set ``state_names`` and ``kernel_op`` and implement

    - ``step_scalars(count, lr) -> tuple[float | bool, ...]``: the per-step scalars
      (after the schedule and bias corrections), shared by the reference and the kernels;
    - ``reference(xp, p, g, states, scalars) -> (p_new, new_states)``: the math, in the
      state dtype, as pure array-API code.
    """

    state_names: tuple = ()
    kernel_op: str = ""
    per_leaf_dispatch = True

    def __init__(self, learning_rate, *, on_nonfinite: str = "raise"):
        super().__init__(on_nonfinite=on_nonfinite)
        self.learning_rate = _validate.check_learning_rate(learning_rate)

    def needs_params(self) -> bool:
        return False

    def init_value(self, name: str) -> float:
        return 0.0

    def _init(self, ns, leaves):
        """Each state array ``full(p.shape, init_value)``; NumPy and torch state keeps the param's
        memory layout (a ``channels_last`` weight gets ``channels_last`` state)."""
        out = {}
        full_like = ns.xp.full_like if ns.library in ("numpy", "torch") else None
        for name in self.state_names:
            v = self.init_value(name)
            out[name] = [
                full_like(p, v, dtype=state_dtype(ns.xp, p.dtype)) if full_like is not None else
                ns.xp.full(p.shape, v, dtype=state_dtype(ns.xp, p.dtype), device=ns.device)
                for p in leaves
            ]
        return out

    def _check_state(self, ns, leaves, paths, state, params_missing):
        if params_missing and self.needs_params():
            raise ValueError(f"params: {self.name} with weight decay needs the params in update()")
        dtypes = [state_dtype(ns.xp, p.dtype) for p in leaves]
        for name in self.state_names:
            if name not in state:
                raise ValueError(f"state: missing entry {name!r}; was it made by this optimizer's init()?")
            _validate.check_state_leaves(name, state[name], paths, ns, leaves, dtypes)

    def _scalars(self, count: int):
        lr = _validate.learning_rate_at(self.learning_rate, count)
        return self.step_scalars(count + 1, lr)

    def step_description(self, count: int) -> tuple:
        """The step scalars of step ``count + 1`` (:meth:`step_scalars`): what a backend receives."""
        return self._scalars(count)

    def _kernel_groups(self, leaves, g_leaves, state):
        return (leaves, g_leaves, *[state[n] for n in self.state_names])

    def _new_state(self, state, new_states_by_name):
        new = dict(state)
        new["count"] = state["count"] + 1
        new.update(new_states_by_name)
        return new

    def _reference_leaves(self, ns, leaves, g_leaves, state):
        """The reference on every leaf, in the state dtype: ``(p32s, new_p32s, new_state)``."""
        xp = ns.xp
        scalars = self._scalars(state["count"])
        olds, news = [], []
        per_name = {name: [] for name in self.state_names}
        for i, (p, g) in enumerate(zip(leaves, g_leaves)):
            low = is_low_precision(p.dtype)
            p32 = xp.astype(p, xp.float32) if low else p
            g32 = xp.astype(g, xp.float32) if low else g
            p_new, new_states = self._reference(
                ns, p32, g32, [state[n][i] for n in self.state_names], scalars)
            olds.append(p32)
            news.append(p_new)
            for name, s in zip(self.state_names, new_states):
                per_name[name].append(s)
        return olds, news, self._new_state(state, per_name)

    def _update(self, ns, leaves, g_leaves, state, paths):
        olds, news, new_state = self._reference_leaves(ns, leaves, g_leaves, state)
        updates = [ns.xp.astype(q - o, p.dtype) if is_low_precision(p.dtype) else q - o
                   for p, o, q in zip(leaves, olds, news)]
        return updates, new_state

    _step = Optimizer._fused_step

    def _reference_step(self, ns, leaves, g_leaves, state, paths):
        _, news, new_state = self._reference_leaves(ns, leaves, g_leaves, state)
        return [ns.xp.astype(q, p.dtype) if is_low_precision(p.dtype) else q for p, q in zip(leaves, news)], new_state

    def _in_range(self, ns, views, plan):
        # no range check: a second read of every gradient before the in-place one-pass kernel
        # would cost about a fifth of a first-order step. The updates stay finite short of
        # gradients near the dtype's largest value: Adam's m̂/(√v̂+ε) and AdaGrad's g/(√s+ε) are
        # bounded (v or s overflowing to Inf gives a zero step; m only overflows for |g| above
        # half the largest value); SGD with momentum, whose buffer reaches |g|/(1-μ), overrides
        # this with the range check (update() and the reference step check the update)
        return True

    def _range_check_finds_nonfinite(self) -> bool:
        return False  # no range check: the finiteness pre-pass runs

    def _run_kernel(self, backend, step, views, plan, ns, leaves, g_leaves, state, paths):
        backend.run(self.kernel_op, leaves, g_leaves, [state[n] for n in self.state_names], step, g_views=views)
        return self._new_state(state, {n: state[n] for n in self.state_names})

    def _reference(self, ns, p, g, states, scalars):
        p_new, new_states = self.reference(ns.xp, p, g, states, scalars)
        if ns.library == "numpy":  # NumPy turns 0-d results into scalars
            import numpy as np

            return np.asarray(p_new), [np.asarray(s) for s in new_states]
        return p_new, new_states

    def step_scalars(self, t: int, lr: float):
        raise TypeError(f"{type(self).__name__} must implement step_scalars()")  # pragma: no cover

    def reference(self, xp, p, g, states, scalars):
        raise TypeError(f"{type(self).__name__} must implement reference()")  # pragma: no cover
