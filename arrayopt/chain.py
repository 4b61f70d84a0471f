"""Composition: :func:`chain` (optimizers and transforms in sequence) and :func:`apply_updates`."""

from __future__ import annotations

from typing import Any

from . import _tree, _validate
from ._fused import write_params
from ._state_use import no_autograd, take
from .base import Optimizer, _check_state_header, _check_state_paths, _hand_over, _header, apply_leaf

__all__ = ["Chain", "chain", "apply_updates"]


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leaf by leaf (new arrays; bf16/f16 add in float32)."""
    leaves, treedef, paths, ns = _validate.check_params(params)
    u_leaves = _validate.check_like("updates", updates, treedef, paths, leaves, ns)
    return _tree.unflatten(treedef, [apply_leaf(ns.xp, p, u) for p, u in zip(leaves, u_leaves)])


class Chain(Optimizer):
    """Run optimizers/transforms in sequence: each one's updates are the next one's input."""

    name = "chain"
    no_kernel_reason = ("a chain runs each part's update(), the array-API reference "
                        "(fused kernels serve step() of a single optimizer)")

    def __init__(self, *parts: Optimizer):
        super().__init__()
        if not parts:
            raise ValueError("chain: needs at least one optimizer or transform")
        for i, p in enumerate(parts):
            if not isinstance(p, Optimizer):
                raise TypeError(f"chain: argument {i} is {type(p).__name__}, not an arrayopt optimizer")
        self.parts = tuple(parts)
        self.hyperparams = {"parts": [type(p).__name__ for p in parts]}

    def init(self, params):
        leaves, treedef, paths, ns = _validate.check_params(params)
        state = _header(self.name, paths)
        state["inner"] = [p.init(params) for p in self.parts]
        return state

    def update(self, grads, state, params=None, *, stats=None):
        _check_state_header(state, self.name)
        inner = state.get("inner")
        if not isinstance(inner, list) or len(inner) != len(self.parts):
            raise ValueError(f"state['inner']: expected {len(self.parts)} inner states")
        # validate every stage's state before any stage runs, so errors leave nothing half-done
        arg = "params" if params is not None else "grads"
        leaves, treedef, paths, ns = _validate.check_params(params if params is not None else grads, arg,
                                                            state.get("param_paths"))
        _check_state_paths(state, paths, arg)
        for i, (part, s) in enumerate(zip(self.parts, inner)):
            _check_state_header(s, part.name, f"state['inner'][{i}]")
            _check_state_paths(s, paths, arg, f"state['inner'][{i}]")
            part._check_state(ns, leaves, paths, s, params is None)
        takers = [part.takes_stats for part in self.parts]
        if stats is not None:
            if not any(takers):
                raise TypeError(f"stats: no part of this chain takes per-layer statistics "
                                f"({', '.join(p.name for p in self.parts)}); call it without stats=")
            for part in self.parts:
                if part.takes_stats:
                    checked = part._check_stats(ns, leaves, paths, stats)
                    # non-finite statistics raise before any stage runs; non-finite gradients are
                    # reported first (or skipped) by the first stage, as without a chain
                    g_leaves = leaves if params is None else _validate.check_like(
                        "grads", grads, treedef, paths, leaves, ns)
                    if _validate.all_finite(ns.xp, g_leaves):
                        part._check_stats_finite(ns.xp, checked or {})
        new_inner = []
        updates = grads
        skipped = False
        with take(state), no_autograd(ns):
            for part, s, takes in zip(self.parts, inner, takers):
                if skipped:  # an earlier stage skipped a non-finite step: later stages keep their state
                    new_inner.append(s)
                    continue
                updates, s2 = part.update(updates, s, params, **({"stats": stats} if takes else {}))
                skipped = s2["nonfinite_skipped"] != s["nonfinite_skipped"]
                new_inner.append(s2)
            new = dict(state, inner=new_inner)
            if skipped:
                new["nonfinite_skipped"] = state["nonfinite_skipped"] + 1
            else:
                new["count"] = state["count"] + 1
            return updates, _hand_over(state, new)

    def step(self, params, grads, state, *, stats=None):
        updates, new_state = self.update(grads, state, params, stats=stats)
        leaves, treedef, paths, ns = _validate.check_params(params, order=new_state.get("param_paths"))
        u_leaves = _tree.flatten_like(updates, treedef, "updates")
        with no_autograd(ns):
            new = [apply_leaf(ns.xp, p, u) for p, u in zip(leaves, u_leaves)]
            return _tree.unflatten(treedef, write_params(ns, leaves, new)), new_state


def chain(*parts: Optimizer) -> Optimizer:
    """Compose transforms: ``chain(clip_by_global_norm(1.0), adam(1e-3))``."""
    return Chain(*parts)
