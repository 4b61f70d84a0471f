"""Per-parameter groups: one optimizer object and one state for a tree that different
optimizers serve (optax's ``multi_transform``/``partition`` and ``masked``).

>>> import numpy as np, arrayopt as ao
>>> params = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
>>> opt = ao.partition(lambda p: {k: "matrix" if v.ndim >= 2 else "vector" for k, v in p.items()},
...                    {"matrix": ao.sonew(1e-2, band=1), "vector": ao.adam(1e-3)})
>>> state = opt.init(params)
>>> params, state = opt.step(params, {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}, state)
>>> state["count"]
1

Each label's optimizer sees the sub-tree of the leaves with that label, with the same
leaf paths as in the full tree (``['w']``, ``['layers'][0]``), so its error messages
name the leaf as the caller knows it. Lists and tuples of the full tree become dicts
keyed by their indices in the sub-tree (the paths read the same). The label of each
leaf is computed once, by ``init``, and kept in the state (``state["groups"]``: the
index of each leaf's label in ``transforms``).
"""

from __future__ import annotations

from typing import Any, Callable

from . import _tree, _validate
from ._state_use import no_autograd, take
from .base import Optimizer, _check_state_header, _check_state_paths, _hand_over, _header

__all__ = ["Partition", "partition", "masked"]


def _subtree(treedef: _tree.TreeDef, leaves: list, keep: list):
    """The tree of the leaves whose ``keep`` flag is set (``None`` when there is none).

    Containers become dicts keyed by the original key or index, so every kept leaf has
    the path it has in the full tree; containers left empty are dropped.
    """
    it = iter(zip(leaves, keep))

    def build(td):
        if td.kind == "leaf":
            leaf, flag = next(it)
            return (leaf,) if flag else None
        keys = td.keys if td.kind == "dict" else range(len(td.children))
        out = {}
        for k, child in zip(keys, td.children):
            sub = build(child)
            if sub is not None:
                out[k] = sub[0]
        return (out,) if out else None

    got = build(treedef)
    return None if got is None else got[0]


def _labels_like(labels, params) -> list:
    """The label of each params leaf, in params order: dict keys are matched by name (in any
    order); a single label (not a container) labels a whole sub-tree."""
    if not isinstance(labels, (dict, list, tuple)):
        return [labels] * len(_tree.flatten(params)[0])
    if isinstance(params, dict) and isinstance(labels, dict) and set(labels) == set(params):
        return [lab for k in params for lab in _labels_like(labels[k], params[k])]
    if (isinstance(params, (list, tuple)) and isinstance(labels, (list, tuple))
            and len(labels) == len(params)):
        return [lab for lab_i, p_i in zip(labels, params) for lab in _labels_like(lab_i, p_i)]
    raise ValueError("labels: tree structure differs from params (the labels tree must have "
                     "one label per params leaf, in the same containers)")


class Partition(Optimizer):
    r"""``labels`` assign each params leaf a key of ``transforms``; leaves of label ``ℓ`` are
    updated by ``transforms[ℓ]`` alone: :math:`u_i = T_{\ell(i)}(g_{S_\ell}, s_\ell)_i` with
    :math:`S_\ell = \{i : \ell(i) = \ell\}`.

    ``labels`` is a tree of labels with the structure of params, or a function
    ``params -> labels tree``. Non-finite gradients are checked once over the whole tree:
    the default raises, ``on_nonfinite="skip"`` skips the step of every group (no group
    steps on half of a bad gradient).
    """

    name = "partition"
    no_kernel_reason = "each group runs its own optimizer's step (its fused kernel or the reference)"

    def __init__(self, labels: Any, transforms: dict, *, on_nonfinite: str = "raise"):
        super().__init__(on_nonfinite=on_nonfinite)
        if not isinstance(transforms, dict) or not transforms:
            raise ValueError(f"transforms: expected a non-empty dict {{label: optimizer}}, got {transforms!r} "
                             f"(the order is partition(labels, transforms); optax's is the reverse)")
        for label, opt in transforms.items():
            if not isinstance(opt, Optimizer):
                raise TypeError(f"transforms[{label!r}]: expected an arrayopt optimizer, got {type(opt).__name__}")
        if not callable(labels) and not isinstance(labels, (dict, list, tuple)) and labels not in transforms:
            raise ValueError(f"labels: {labels!r} is neither a function, a tree of labels, nor a key of "
                             f"transforms ({', '.join(map(repr, transforms))})")
        self.labels = labels
        self.transforms = dict(transforms)
        self.keys = tuple(transforms)
        self.hyperparams = {"labels": labels, "transforms": {str(k): v for k, v in transforms.items()}}

    # ---------------------------------------------------------------- labels

    def _leaf_groups(self, params, treedef, paths) -> tuple:
        """The index in ``transforms`` of each leaf's label."""
        labels = self.labels(params) if callable(self.labels) else self.labels
        groups = []
        for lab, path in zip(_labels_like(labels, params), paths):
            try:
                groups.append(self.keys.index(lab))
            except (ValueError, TypeError):
                raise ValueError(f"labels leaf {path}: label {lab!r} is not a key of transforms "
                                 f"({', '.join(map(repr, self.keys))})") from None
        return tuple(groups)

    def _split(self, treedef, leaves, groups):
        """``[(k, sub-tree of group k)]`` for every group with at least one leaf."""
        return [(k, _subtree(treedef, leaves, [g == k for g in groups]))
                for k in range(len(self.keys)) if k in groups]

    # ---------------------------------------------------------------- API

    def init(self, params):
        leaves, treedef, paths, ns = _validate.check_params(params)
        _validate.check_no_shared_memory(leaves, paths)
        groups = self._leaf_groups(params, treedef, paths)
        state = _header(self.name, paths)
        state["groups"] = groups
        inner = [None] * len(self.keys)
        for k, sub in self._split(treedef, leaves, groups):
            inner[k] = self.transforms[self.keys[k]].init(sub)
        state["inner"] = inner
        return state

    def _validate_call(self, grads, state, params):
        """Check everything before any group runs, so a rejected call writes nothing."""
        _check_state_header(state, self.name)
        arg = "params" if params is not None else "grads"
        leaves, treedef, paths, ns = _validate.check_params(params if params is not None else grads, arg)
        g_leaves = leaves if params is None else _validate.check_like("grads", grads, treedef, paths, leaves, ns)
        _check_state_paths(state, paths, arg)
        groups, inner = state.get("groups"), state.get("inner")
        if (not isinstance(groups, tuple) or len(groups) != len(paths)
                or not all(isinstance(g, int) and 0 <= g < len(self.keys) for g in groups)):
            raise ValueError(f"state['groups']: expected a tuple of {len(paths)} indices into transforms; "
                             f"was the state made by this optimizer's init()?")
        if not isinstance(inner, list) or len(inner) != len(self.keys):
            raise ValueError(f"state['inner']: expected {len(self.keys)} inner states (one per label)")
        for k, sub in self._split(treedef, leaves, groups):
            part, s, where = self.transforms[self.keys[k]], inner[k], f"state['inner'][{k}]"
            _check_state_header(s, part.name, where)
            sub_leaves, _, sub_paths = _tree.flatten(sub)
            _check_state_paths(s, sub_paths, arg, where)
            part._check_state(ns, sub_leaves, sub_paths, s, params is None)
        return ns, treedef, leaves, g_leaves, paths, groups

    def _skip_or_raise(self, ns, g_leaves, paths, state) -> dict | None:
        """``None`` when the gradients are finite; the skipped state when skipping; raises otherwise."""
        if _validate.all_finite(ns.xp, g_leaves):
            return None
        self._handle_nonfinite(ns.xp, g_leaves, paths)
        return self._skipped_state(state)

    def _run(self, call, grads, state, params):
        """Run ``call(part, sub_params, sub_grads, s)`` per group; ``(per-leaf outputs, new state)``."""
        ns, treedef, leaves, g_leaves, paths, groups = self._validate_call(grads, state, params)
        # the state's token stays taken (the caller hands the state over) unless this raises
        with take(state), no_autograd(ns):
            skipped = self._skip_or_raise(ns, g_leaves, paths, state)
            if skipped is not None:
                return ns, treedef, leaves, None, skipped
            outs = [None] * len(leaves)
            new_inner = list(state["inner"])
            for k, sub_g in self._split(treedef, g_leaves, groups):
                sub_p = None if params is None else _subtree(treedef, leaves, [g == k for g in groups])
                out, new_inner[k] = call(self.transforms[self.keys[k]], sub_p, sub_g, state["inner"][k])
                where = [i for i, g in enumerate(groups) if g == k]
                for i, o in zip(where, _tree.flatten(out)[0]):
                    outs[i] = o
            return ns, treedef, leaves, outs, dict(state, inner=new_inner, count=state["count"] + 1)

    def update(self, grads, state, params=None):
        ns, treedef, leaves, outs, new = self._run(
            lambda part, p, g, s: part.update(g, s, p), grads, state, params)
        if outs is None:
            outs = [ns.xp.zeros(p.shape, dtype=p.dtype, device=ns.device) for p in leaves]
        return _tree.unflatten(treedef, outs), _hand_over(state, new)

    def step(self, params, grads, state):
        if params is None:
            raise TypeError("params: step() needs the params")
        ns, treedef, leaves, outs, new = self._run(
            lambda part, p, g, s: part.step(p, g, s), grads, state, params)
        if outs is None:
            return params, _hand_over(state, new)
        # each group's step wrote its writeable leaves in place and returned them
        return _tree.unflatten(treedef, outs), _hand_over(state, new)


def partition(labels: Any, transforms: dict, *, on_nonfinite: str = "raise") -> Optimizer:
    """Per-parameter groups (optax ``multi_transform``): ``transforms[label]`` updates the leaves
    that ``labels`` (a labels tree, or ``params -> labels tree``) gives that label.

    >>> import arrayopt as ao
    >>> opt = ao.partition({"w": "decay", "b": "plain"},
    ...                    {"decay": ao.adamw(1e-3, weight_decay=0.1), "plain": ao.adam(1e-3)})
    """
    return Partition(labels, transforms, on_nonfinite=on_nonfinite)


class _PassThrough(Optimizer):
    """``u = g``: the leaves a mask leaves out keep their incoming updates."""

    name = "pass_through"

    def __init__(self):
        super().__init__()
        self.hyperparams = {}

    def _init(self, ns, leaves):
        return {}

    def _update(self, ns, leaves, g_leaves, state, paths):
        return list(g_leaves), dict(state, count=state["count"] + 1)


def masked(opt: Optimizer, mask: Any | Callable, *, on_nonfinite: str = "raise") -> Optimizer:
    """``opt`` on the leaves where ``mask`` (a tree of bools, or ``params -> tree of bools``) is
    ``True``; the other leaves' updates pass through unchanged (optax ``masked``), which is
    what a transform inside :func:`arrayopt.chain` needs:

    >>> import arrayopt as ao
    >>> opt = ao.chain(ao.masked(ao.clip_by_global_norm(1.0), {"w": True, "b": False}), ao.adam(1e-3))

    Used alone, ``step`` adds the raw gradient to the leaves left out (as optax's ``masked``
    does); to keep leaves fixed, give them ``ao.scale(0.0)`` through :func:`partition`.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt: expected an arrayopt optimizer, got {type(opt).__name__}")

    def as_labels(params):
        m = mask(params) if callable(mask) else mask
        flat, td, paths = _tree.flatten(m)
        for v, path in zip(flat, paths):
            if not isinstance(v, bool) and type(v).__name__ != "bool_":
                raise TypeError(f"mask leaf {path}: expected a bool, got {type(v).__name__}")
        return _tree.unflatten(td, [bool(v) for v in flat])

    return Partition(as_labels, {True: opt, False: _PassThrough()}, on_nonfinite=on_nonfinite)
