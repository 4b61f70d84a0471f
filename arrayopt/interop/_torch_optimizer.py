"""``Optimizer(params, opt)``: any arrayopt optimizer as a ``torch.optim.Optimizer``.

>>> import torch, arrayopt as ao
>>> from arrayopt.interop.torch import Optimizer
>>> model = torch.nn.Linear(4, 2)
>>> optimizer = Optimizer(model.parameters(), ao.adam(1e-3))
>>> model(torch.ones(3, 4)).sum().backward()
>>> optimizer.step()
>>> optimizer.zero_grad()

- ``params``: ``model.parameters()``, ``model.named_parameters()`` or a list of param-group
  dicts. A group dict may set ``"lr"``, ``"opt"`` (another arrayopt optimizer for that
  group) and any hyperparameter of the optimizer by its arrayopt name (``"weight_decay":
  0.0`` for biases and norms, ``"eps"``, ``"b2"``, ...): the group's optimizer is ``opt``
  made again with those values (validated like a new one; in a ``chain`` or ``partition``,
  every part with that hyperparameter gets it). As in torch, each group lists the numeric
  hyperparameters of a single optimizer (``param_groups[0]["weight_decay"]``); changing
  one there takes effect at the next step.
- ``param_groups[i]["lr"]`` is the rate the step uses, so ``torch.optim.lr_scheduler``
  works unchanged. When every part of the group's optimizer has one float rate ``η``, the
  group's ``lr`` starts at ``η`` and replaces it. When the optimizer has an arrayopt
  schedule ``η(t)`` (or parts with different rates), ``lr`` starts at 1.0 and multiplies
  it: the step uses ``lr · η(t)``, a torch scheduler scaling the arrayopt schedule.
- Each group keeps one arrayopt state for the params that have a gradient (``grad is
  None``, e.g. ``requires_grad=False``, leaves a param out, as torch does; a different
  set of such params gets a state of its own).
- ``state_dict()`` holds tensors, numbers and strings only (``torch.load(...,
  weights_only=True)`` reads it); training continues bit-identically after
  ``load_state_dict``. ``torch.amp.GradScaler`` works: it unscales the gradients in
  ``param_groups`` and skips ``step()`` when one is not finite.
- CPU tensors reach the Numba kernels zero-copy (``step`` writes the params in place).
"""

from __future__ import annotations

import torch

from ..base import Chain
from ..base import Optimizer as _ArrayoptOptimizer
from ..groups import Partition
from ..state_io import _check_not_consumed, _decode, _encode, _settle
from ._rebuild import GroupRate, arguments, hyperparameter_names, rebuild, single_rate

__all__ = ["Optimizer"]

# group keys that are not arrayopt hyperparameters (the others must be)
_GROUP_KEYS = {"params", "lr", "opt", "param_names", "initial_lr"}


def _group_optimizer(opt: _ArrayoptOptimizer, rate: GroupRate, overrides: dict) -> _ArrayoptOptimizer:
    """``opt`` with the group's hyperparameter overrides and its learning rate read from ``rate``."""
    def changes(args):
        out = {k: v for k, v in overrides.items() if k in args}
        if "learning_rate" in args:
            out["learning_rate"] = rate.rate_for(args["learning_rate"])
        return out

    return rebuild(opt, changes)


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that steps ``opt`` (any arrayopt optimizer) on each param group."""

    def __init__(self, params, opt: _ArrayoptOptimizer):
        if not isinstance(opt, _ArrayoptOptimizer):
            raise TypeError(f"opt: expected an arrayopt optimizer, got {type(opt).__name__}")
        self._default_opt = opt
        # per param group: (GroupRate, the group's optimizer, the optimizer it was made from,
        # the names of its hyperparameters, the overrides it was made with)
        self._groups: list = []
        self._states: list = []  # per param group: {indices of the params with grads: arrayopt state}
        super().__init__(params, {"lr": _default_lr(opt)})

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group: expected a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        opt = group.pop("opt", self._default_opt)
        if not isinstance(opt, _ArrayoptOptimizer):
            raise TypeError(f"param_group['opt']: expected an arrayopt optimizer, got {type(opt).__name__}")
        names = hyperparameter_names(opt) - {"learning_rate"}
        for key in group:
            if key not in _GROUP_KEYS and key not in names:
                raise ValueError(
                    f"param_group[{key!r}]: not a hyperparameter of {type(opt).__name__}; a group sets 'lr', "
                    f"'opt' (an arrayopt optimizer) or hyperparameters of the optimizer by name")
        if not isinstance(opt, (Chain, Partition)):  # its numeric hyperparameters, as torch lists them
            for k, v in arguments(opt).items():
                if k in names and type(v) in (bool, int, float):
                    group.setdefault(k, v)
        overrides = {k: v for k, v in group.items() if k in names}
        group.setdefault("lr", _default_lr(opt))
        lr = group["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"param_group['lr']: expected a float >= 0, got {lr!r}")
        rate = GroupRate(float(lr), multiplier=single_rate(opt) is None)
        group_opt = _group_optimizer(opt, rate, overrides)  # validates the overrides before anything is added
        super().add_param_group(group)
        bad = [p.dtype for p in self.param_groups[-1]["params"] if not p.is_floating_point()]
        if bad:
            self.param_groups.pop()
            raise TypeError(f"params: dtype {bad[0]} is not a real floating dtype; arrayopt optimizes "
                            f"float16, bfloat16, float32 or float64 params")
        self._groups.append((rate, group_opt, opt, names, overrides))
        self._states.append({})

    def _current(self, gi: int):
        """The group's ``(GroupRate, optimizer)``, rebuilt if an override in ``param_groups`` changed."""
        rate, group_opt, opt, names, overrides = self._groups[gi]
        now = {k: v for k, v in self.param_groups[gi].items() if k in names}
        if now != overrides:
            group_opt = _group_optimizer(opt, rate, now)
            self._groups[gi] = (rate, group_opt, opt, names, now)
        return rate, group_opt

    # ---------------------------------------------------------------- step

    def _active(self, group) -> tuple:
        return tuple(i for i, p in enumerate(group["params"]) if p.grad is not None)

    @staticmethod
    def _tree(group, active: tuple, grads: bool = False) -> dict:
        """The params (or grads) of ``active`` as a dict keyed by their names (``named_parameters``)
        or their index in the group, so that errors name the tensor."""
        names = group.get("param_names") or [str(i) for i in range(len(group["params"]))]
        return {names[i]: (group["params"][i].grad if grads else group["params"][i]).detach() for i in active}

    def _state_for(self, gi: int, active: tuple, params: dict):
        states = self._states[gi]
        if active not in states:
            states[active] = self._current(gi)[1].init(params)
        return states[active]

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every group on the params that have a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for gi, group in enumerate(self.param_groups):
            active = self._active(group)
            if not active:
                continue
            params, grads = self._tree(group, active), self._tree(group, active, grads=True)
            work.append((gi, active, params, grads, self._state_for(gi, active, params)))
        if len(work) > 1:  # a group with a non-finite gradient steps first: if it raises, no group has stepped
            work.sort(key=lambda w: all(bool(torch.isfinite(g).all()) for g in w[3].values()))
        for gi, active, params, grads, state in work:
            rate, opt = self._current(gi)
            rate.value = float(self.param_groups[gi]["lr"])
            new_params, self._states[gi][active] = opt.step(params, grads, state)
            for p, q in zip(params.values(), new_params.values()):
                if q is not p:  # the reference path gave new arrays (non-contiguous params)
                    p.copy_(q)
        return loss

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """``{"state": {}, "param_groups": [...], "arrayopt": [...]}``: tensors, numbers and strings only."""
        groups, index = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            groups.append(packed)
        states = []
        for per_group in self._states:
            saved = []
            for active, state in per_group.items():
                _check_not_consumed(state)
                _settle(state)
                arrays: dict = {}
                tree = _encode(state, "", arrays)
                saved.append({"active": list(active), "tree": tree,
                              "arrays": {k: torch.from_numpy(a.copy()) for k, a in arrays.items()}})
            states.append(saved)
        return {"state": {}, "param_groups": groups, "arrayopt": states}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` of an optimizer over the same param groups (checked first)."""
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "arrayopt" not in state_dict:
            raise ValueError("state_dict: expected the dict returned by arrayopt.interop.torch.Optimizer.state_dict()")
        saved_groups, saved_states = state_dict["param_groups"], state_dict["arrayopt"]
        if len(saved_groups) != len(self.param_groups) or len(saved_states) != len(self.param_groups):
            raise ValueError(f"state_dict: holds {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        restored = []
        for gi, (group, saved, entries) in enumerate(zip(self.param_groups, saved_groups, saved_states)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict['param_groups'][{gi}]: holds {len(saved['params'])} params, "
                                 f"this optimizer's group has {len(group['params'])}")
            states = {}
            for entry in entries:
                active = tuple(int(i) for i in entry["active"])
                if any(i >= len(group["params"]) for i in active):
                    raise ValueError(f"state_dict['arrayopt'][{gi}]: param index out of range")
                like = self._current(gi)[1].init(self._tree(group, active))
                data = {k: t.numpy() for k, t in entry["arrays"].items()}
                try:
                    states[active] = _decode(entry["tree"], like, "", data)
                except ValueError as e:
                    raise ValueError(f"state_dict['arrayopt'][{gi}]: {e}") from None
            restored.append(states)
        for group, saved in zip(self.param_groups, saved_groups):  # everything checked: write
            group.update({k: v for k, v in saved.items() if k != "params"})
        self._states = restored


def _default_lr(opt: _ArrayoptOptimizer) -> float:
    rate = single_rate(opt)
    return 1.0 if rate is None else rate
