"""The per-leaf entries of an arrayopt state: a sub-state over some leaves, merged back after a step.

A torch param whose gradient is ``None`` is left out of a step (no update, no state
change), so the adapter steps the sub-tree of the params that have gradients with
:func:`select` (their per-leaf entries, the rest of the state shared) and writes the
result back with :func:`merge`. The per-leaf entries of a state are its lists with one
entry per params leaf (``Optimizer._per_leaf_keys``); a chain's parts and a partition's
labels are followed into their inner states. :func:`leaf_entries` lists the entries of
one leaf by name, torch's names where the math is torch's (what ``optimizer.state[p]`` shows).
"""

from __future__ import annotations

from ..base import HEADER
from ..chain import Chain
from ..base import Optimizer as _ArrayoptOptimizer
from ..groups import Partition

__all__ = ["select", "merge", "set_count", "leaf_entries", "settle"]


def _per_leaf(opt: _ArrayoptOptimizer, state: dict) -> list:
    n = len(state["param_paths"])
    return [k for k in opt._per_leaf_keys(state, n) if k != "inner"]


def _label_positions(groups: tuple, keep) -> dict:
    """``{label: [position of each kept leaf among the leaves of that label]}``."""
    seen: dict = {}
    where: dict = {}
    for i, lab in enumerate(groups):
        seen[lab] = seen.get(lab, -1) + 1
        where[i] = (lab, seen[lab])
    out: dict = {}
    for i in keep:
        lab, pos = where[i]
        out.setdefault(lab, []).append(pos)
    return out


def select(opt: _ArrayoptOptimizer, state: dict, keep) -> dict:
    """The state of ``opt`` over the leaves ``keep`` (indices, ascending); arrays are shared."""
    sub = dict(state)
    sub["param_paths"] = tuple(state["param_paths"][i] for i in keep)
    if isinstance(opt, Chain):
        sub["inner"] = [select(p, s, keep) for p, s in zip(opt.parts, state["inner"])]
    elif isinstance(opt, Partition):
        sub["groups"] = tuple(state["groups"][i] for i in keep)
        inner = list(state["inner"])
        for lab, pos in _label_positions(state["groups"], keep).items():
            inner[lab] = select(opt.transforms[opt.keys[lab]], state["inner"][lab], pos)
        sub["inner"] = inner
    else:
        for k in _per_leaf(opt, state):
            sub[k] = [state[k][i] for i in keep]
    return sub


def merge(opt: _ArrayoptOptimizer, state: dict, new_sub: dict, keep) -> dict:
    """``state`` with the entries of the leaves ``keep`` taken from ``new_sub`` (a stepped
    :func:`select`), and its other entries (counters, scalars) from ``new_sub``."""
    out = {k: v for k, v in new_sub.items()}
    out["param_paths"] = state["param_paths"]
    out["consumed"] = False
    if isinstance(opt, Chain):
        out["inner"] = [merge(p, s, ns, keep) for p, s, ns in zip(opt.parts, state["inner"], new_sub["inner"])]
    elif isinstance(opt, Partition):
        out["groups"] = state["groups"]
        inner = list(state["inner"])
        for lab, pos in _label_positions(state["groups"], keep).items():
            inner[lab] = merge(opt.transforms[opt.keys[lab]], state["inner"][lab], new_sub["inner"][lab], pos)
        out["inner"] = inner
    else:
        for k in _per_leaf(opt, state):
            got = dict(zip(keep, new_sub[k]))
            merged = [got[i] if i in got else state[k][i] for i in range(len(state[k]))]
            out[k] = type(state[k])(merged)
    return out


def set_count(opt: _ArrayoptOptimizer, state: dict, count: int) -> dict:
    """``state`` (a copy) whose step count, and its inner states' counts, are ``count``."""
    out = dict(state, count=count)
    if isinstance(opt, Chain):
        out["inner"] = [set_count(p, s, count) for p, s in zip(opt.parts, state["inner"])]
    elif isinstance(opt, Partition):
        out["inner"] = [s if s is None else set_count(opt.transforms[k], s, count)
                        for k, s in zip(opt.keys, state["inner"])]
    return out


def settle(state: dict) -> None:
    """Finish pending asynchronous work (Shampoo's root job) of ``state`` and its inner states."""
    from .._state_use import settle as _settle

    _settle(state)


def leaf_entries(opt: _ArrayoptOptimizer, state: dict, i: int, prefix: str = "") -> dict:
    """The per-leaf entries of leaf ``i`` by name (``"0.mu"`` for part 0 of a chain when two parts
    have an entry of the same name)."""
    if isinstance(opt, Chain):
        parts = [leaf_entries(p, s, i) for p, s in zip(opt.parts, state["inner"])]
        out: dict = {}
        clash = {k for j, d in enumerate(parts) for k in d if any(k in e for e in parts[j + 1:])}
        for j, d in enumerate(parts):
            out.update({(f"{j}.{k}" if k in clash else k): v for k, v in d.items()})
        return out
    if isinstance(opt, Partition):
        lab = state["groups"][i]
        pos = state["groups"][:i].count(lab)
        return leaf_entries(opt.transforms[opt.keys[lab]], state["inner"][lab], pos)
    rename = _TORCH_NAMES.get(opt.name, {})
    return {rename.get(k, k): state[k][i] for k in _per_leaf(opt, state) if k not in HEADER}


#: torch.optim's names of per-param state where the math is torch's (SGD's momentum_buffer and
#: Adagrad's sum already have them)
_TORCH_NAMES = {"adam": {"mu": "exp_avg", "nu": "exp_avg_sq"}, "adamw": {"mu": "exp_avg", "nu": "exp_avg_sq"}}
