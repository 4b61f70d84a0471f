"""``Optimizer(params, opt)``: any arrayopt optimizer as a ``torch.optim.Optimizer``.

>>> import torch, arrayopt as ao
>>> from arrayopt.interop.torch import Optimizer
>>> model = torch.nn.Linear(4, 2)
>>> optimizer = Optimizer(model.parameters(), ao.adam(1e-3))
>>> model(torch.ones(3, 4)).sum().backward()
>>> optimizer.step()
>>> optimizer.zero_grad()

Param groups
    ``params``: ``model.parameters()``, ``model.named_parameters()`` or a list of param-group
    dicts, written as for ``torch.optim``: ``{"params": ..., "lr": 3e-4, "betas": (0.9, 0.95),
    "eps": 1e-8, "weight_decay": 0.1}``. torch's ``betas`` is arrayopt's ``b1, b2``; ``lr``,
    ``eps``, ``weight_decay``, ``momentum``, ``nesterov`` mean the same in both; any other
    hyperparameter of the optimizer goes by its arrayopt name, and ``"opt"`` gives the group an
    optimizer of its own. torch-only options (``amsgrad``, ``maximize``, ``foreach``, ``fused``,
    ``capturable``, ``differentiable``, ``dampening``, ``lr_decay``) are accepted at torch's
    default and refused by name otherwise. The group's optimizer is ``opt`` made again with the
    group's values (validated like a new one; in a ``chain`` or ``partition`` every part with
    that hyperparameter gets it); changing a value in ``param_groups`` takes effect at the next
    step. A param may appear once in one group: the same tensor twice, or two views of
    overlapping memory (``p`` and ``p.detach()``), or a zero-stride (expanded) tensor raise a
    ``ValueError`` naming them when the group is added.

Learning rate
    ``param_groups[i]["lr"]`` is the rate the next step uses, so loggers print it and
    ``torch.optim.lr_scheduler`` sets it. With one float rate ``η`` in the optimizer, ``lr``
    starts at ``η`` (or the group's ``"lr"``) and is the rate. With an arrayopt schedule
    ``η(t)`` (or parts with different rates), ``lr`` shows ``s·η(t)`` of the first part with a
    rate, updated after each step, ``s`` starting at 1; setting ``lr`` to ``L`` sets ``s`` so
    that the next step uses ``L`` (every part's rate is scaled alike), so a chainable torch
    scheduler (``StepLR``) scales the arrayopt schedule.

Gradients
    A param whose ``grad`` is ``None`` (an unused branch, ``requires_grad=False``) is left as it
    is that step, its state entries and step count too, as ``torch.optim`` does; each group
    keeps one state, and a step with some gradients missing steps the sub-tree of the present
    ones with their state entries (params of different step counts step in separate calls, so
    Adam's bias correction is per param, as torch's ``state[p]["step"]``). Sparse gradients
    raise a ``TypeError``. Every group is checked (rates, values, gradients, statistics)
    before any group writes; a non-finite gradient raises before anything is written (or is
    skipped, ``on_nonfinite="skip"``). ``torch.amp.GradScaler`` works: it unscales the
    gradients and skips ``step()`` when one is not finite.

``optimizer.state``
    ``optimizer.state[p]`` is rebuilt from the group's arrayopt state on each access: a dict of
    that param's state tensors, named as torch names them where the math is torch's
    (``exp_avg``, ``exp_avg_sq`` for Adam/AdamW, ``momentum_buffer`` for SGD, ``sum`` for
    Adagrad) and by their arrayopt names otherwise, with ``step`` (a float tensor, the param's
    step count). The tensors are the state's own: the fused kernels update them in place, the
    reference path replaces them, so read ``optimizer.state[p]`` again after a step rather than
    keeping a dict; writing into the dict changes nothing.

Eva
    ``Optimizer(params, ao.eva(...), stats=KVCapture(model))`` reads the layer statistics of
    each step from the capture (or from ``stats``, a callable returning them keyed by param
    name or by tensor). Eva and Eva-f raise at the first step without ``stats``; Eva-s takes
    none.

Checkpoints
    ``state_dict()`` holds tensors, numbers and strings only (``torch.load(...,
    weights_only=True)`` reads it); training continues bit-identically after
    ``load_state_dict``. CPU tensors reach the Numba kernels zero-copy (``step`` writes the
    params in place).

Data parallel
    DDP: wrap the model in ``DistributedDataParallel`` and use this optimizer as usual (every
    rank holds the whole state). ZeRO-1 (the state sharded over ranks) with torch's own engine::

        from torch.distributed.optim import ZeroRedundancyOptimizer
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Optimizer,
                                            opt=ao.sonew(1e-3))

    Each rank steps the params torch assigns it (whole tensors, so Shampoo's blocks stay on
    one rank) and broadcasts them. FSDP hands the optimizer flat shards of params, so only
    elementwise optimizers (sgd, adam, adamw, adagrad, diagonal sonew) give the unsharded
    result there.
"""

from __future__ import annotations

import torch

from ..chain import Chain
from ..base import Optimizer as _ArrayoptOptimizer
from ..groups import Partition
from ..state_io import BytesArchive, _check_not_consumed, _encode, decode
from . import _leaf_state as leaf_state
from ._rebuild import GroupRate, arguments, hyperparameter_names, own_rates, rebuild, single_rate
from ._torch_groups import check_lr, check_param_tensors, refuse_torch_only, torch_overrides
from ._torch_stats import GroupStats, needs_stats, takes_stats
from ._torch_state_view import StateView

__all__ = ["Optimizer"]

# group keys that are not arrayopt hyperparameters (the others must be)
_GROUP_KEYS = {"params", "lr", "opt", "param_names", "initial_lr", "betas"}


class _Group:
    """What the adapter keeps per param group besides ``param_groups[i]``."""

    def __init__(self, opt, names, overrides, rate, lead):
        self.opt = opt            # the optimizer the group was made from
        self.names = names        # its hyperparameter names
        self.overrides = overrides
        self.rate = rate          # GroupRate: the lr (single float rate) or the scale s
        self.lead = lead          # None, or the first part's own rate (float or schedule)
        self.group_opt = _group_optimizer(opt, rate, overrides)
        self.state = None         # one arrayopt state over all the group's params
        self.counts: list = []    # per param: the steps it has taken

    def published(self, count: int) -> float:
        from .. import _validate

        return self.rate.value * _validate.learning_rate_at(self.lead, count)


def _group_optimizer(opt: _ArrayoptOptimizer, rate: GroupRate, overrides: dict) -> _ArrayoptOptimizer:
    """``opt`` with the group's hyperparameter overrides and its learning rate read from ``rate``."""
    def changes(args):
        out = {k: v for k, v in overrides.items() if k in args}
        if "learning_rate" in args:
            out["learning_rate"] = rate.rate_for(args["learning_rate"])
        return out

    return rebuild(opt, changes)


def _names(group: dict) -> list:
    names = group.get("param_names")
    if names is None or len(names) != len(group["params"]):  # ZeRO copies names of the unsharded group
        return [str(i) for i in range(len(group["params"]))]
    return [str(n) for n in names]


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that steps ``opt`` (any arrayopt optimizer) on each param group."""

    def __init__(self, params, opt: _ArrayoptOptimizer, *, stats=None):
        if not isinstance(opt, _ArrayoptOptimizer):
            raise TypeError(f"opt: expected an arrayopt optimizer, got {type(opt).__name__}")
        self._default_opt = opt
        self._stats = GroupStats(stats)
        self._groups: list = []
        super().__init__(params, {"lr": _default_lr(opt)})

    # torch.optim.Optimizer.__init__ assigns a defaultdict; the adapter's state is its own
    @property
    def state(self):
        """``optimizer.state[p]``: ``p``'s state tensors, rebuilt from the arrayopt state on access."""
        return StateView(self)

    @state.setter
    def state(self, value):
        if len(value):
            raise AttributeError("state: rebuilt from the arrayopt state; use load_state_dict()")

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group: expected a dict, got {type(param_group).__name__}")
        where = f"param_groups[{len(self.param_groups)}]"
        group = dict(param_group)
        opt = group.pop("opt", self._default_opt)
        if not isinstance(opt, _ArrayoptOptimizer):
            raise TypeError(f"{where}['opt']: expected an arrayopt optimizer, got {type(opt).__name__}")
        refuse_torch_only(group, where)
        names = hyperparameter_names(opt) - {"learning_rate"}
        for key in group:
            if key not in _GROUP_KEYS and key not in names:
                raise ValueError(
                    f"{where}[{key!r}]: not a hyperparameter of {type(opt).__name__}; a group sets 'lr', "
                    f"'opt' (an arrayopt optimizer), torch's 'betas' or hyperparameters of the optimizer by name")
        overrides = torch_overrides(group, names, where)
        if not isinstance(opt, (Chain, Partition)):  # its numeric hyperparameters, as torch lists them
            for k, v in arguments(opt).items():
                if k in names and type(v) in (bool, int, float) and k not in overrides and not (
                        "betas" in group and k in ("b1", "b2")):
                    group[k] = v
        single = single_rate(opt)
        if single is None:
            lead = next(iter(own_rates(opt)), 1.0)
            rate = GroupRate(1.0, multiplier=True)
        else:
            lead, rate = None, GroupRate(single, multiplier=False)
        record = _Group(opt, names, overrides, rate, lead)  # validates the overrides
        if "lr" in group:
            self._set_rate(record, check_lr(group["lr"], where), 0, where)
        group["lr"] = record.published(0) if lead is not None else record.rate.value
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group["params"] = params
        probe = dict(group, params=params)
        if params and isinstance(params[0], tuple):  # named_parameters(): torch splits the pairs
            probe = dict(group, params=[p for _, p in params], param_names=[n for n, _ in params])
            params = probe["params"]
        old = [p for g in self.param_groups for p in g["params"]]
        old_names = [f"{n} (group {gi})" for gi, g in enumerate(self.param_groups) for n in _names(g)]
        check_param_tensors(params, [f"{n} (group {len(self.param_groups)})" for n in _names(probe)],
                            old, old_names)
        super().add_param_group(group)
        record.counts = [0] * len(self.param_groups[-1]["params"])
        self._groups.append(record)

    @staticmethod
    def _set_rate(record: _Group, lr: float, count: int, where: str) -> None:
        """Make the next step use ``lr``: the rate itself, or the scale of the group's schedule."""
        if record.lead is None:
            record.rate.value = lr
            return
        shown = record.published(count)
        if lr == shown:
            return
        if shown == 0:
            raise ValueError(f"{where}['lr']: set to {lr!r} while the group's arrayopt schedule is at 0 "
                             f"(lr scales the schedule); give the optimizer a float learning rate to set lr")
        record.rate.value = record.rate.value * lr / shown

    # ---------------------------------------------------------------- step

    def _plan(self) -> list:
        """Check every group and build its step units; nothing is written. A unit is
        ``(gi, keep or None, count, params tree, grads tree)``."""
        stats = self._stats.fetch(self)
        plans = []
        for gi, (group, record) in enumerate(zip(self.param_groups, self._groups)):
            where = f"param_groups[{gi}]"
            lr = check_lr(group["lr"], where)
            overrides = torch_overrides(group, record.names, where)
            trial = _Group.__new__(_Group)
            trial.__dict__.update(record.__dict__, rate=GroupRate(record.rate.value, record.rate.multiplier))
            self._set_rate(trial, lr, _max(record.counts), where)
            rate = trial.rate
            group_opt = record.group_opt
            if overrides != record.overrides:  # made again, so the new values are validated
                group_opt = _group_optimizer(record.opt, record.rate, overrides)
            if needs_stats(group_opt) and not self._stats.given:
                raise TypeError(f"stats: {where} steps {type(group_opt).__name__} ({group_opt.name}), which needs "
                                f"per-layer statistics; pass stats=KVCapture(model) to the Optimizer")
            params = group["params"]
            names = _names(group)
            present = []
            for i, p in enumerate(params):
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided:
                    raise TypeError(f"grads leaf {names[i]}: a {g.layout} gradient; arrayopt optimizers take "
                                    f"dense gradients only (sparse gradients are not supported)")
                present.append(i)
            plans.append((gi, rate, overrides, group_opt, present, names))
        units = []
        for gi, rate, overrides, group_opt, present, names in plans:
            if not present:
                continue
            record = self._groups[gi]
            counts = [record.counts[i] for i in present]
            params = self.param_groups[gi]["params"]
            kw = {}
            if takes_stats(group_opt) and self._stats.given:
                kw["stats"] = stats.for_group(params, names, present, group_opt, record.state)
            if len(present) == len(params) and len(set(counts)) == 1:
                batches = [(None, counts[0], present)]
            else:
                batches = [(tuple(i for i in present if record.counts[i] == c), c, None) for c in sorted(set(counts))]
            for keep, c, _ in batches:
                idx = present if keep is None else keep
                p_tree = {names[i]: params[i].detach() for i in idx}
                g_tree = {names[i]: params[i].grad.detach() for i in idx}
                if "stats" in kw and keep is not None:
                    kw = {"stats": stats.for_group(params, names, keep, group_opt, record.state)}
                units.append((gi, keep, c, p_tree, g_tree, dict(kw)))
        return plans, units, stats

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every group on the params that have a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans, units, stats = self._plan()
        for gi, rate, overrides, group_opt, _, _ in plans:  # everything checked: commit the groups' settings
            record = self._groups[gi]
            record.rate.value = rate.value  # the group's optimizer reads its rate from record.rate
            if overrides != record.overrides:
                record.overrides = overrides
                record.group_opt = group_opt
            if record.state is None and any(u[0] == gi for u in units):
                params = self.param_groups[gi]["params"]
                record.state = record.group_opt.init({n: p.detach() for n, p in zip(_names(self.param_groups[gi]),
                                                                                     params)})
        self._stats.consumed(stats)
        for unit in _order(units):
            self._run(*unit)
        for gi, _, _, _, present, _ in plans:
            record = self._groups[gi]
            if record.lead is not None:
                self.param_groups[gi]["lr"] = record.published(_max(record.counts))
        return loss

    def _run(self, gi, keep, count, p_tree, g_tree, kw):
        record = self._groups[gi]
        opt, state = record.group_opt, record.state
        if keep is None:
            new_params, new_state = opt.step(p_tree, g_tree, state, **kw)
            stepped = new_state["count"] > count
            idx = range(len(record.counts))
        else:
            leaf_state.settle(state)
            sub = leaf_state.set_count(opt, leaf_state.select(opt, state, keep), count)
            new_params, new_sub = opt.step(p_tree, g_tree, sub, **kw)
            stepped = new_sub["count"] > count
            new_state = leaf_state.merge(opt, state, new_sub, keep)
            idx = keep
        for p, q in zip(p_tree.values(), new_params.values()):
            if q is not p:  # the reference path gave new arrays (non-contiguous params)
                p.copy_(q)
        if stepped:
            for i in idx:
                record.counts[i] += 1
        if keep is not None or new_state["count"] != _max(record.counts):
            new_state = leaf_state.set_count(opt, new_state, _max(record.counts))
        record.state = new_state

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """``{"state": {}, "param_groups": [...], "arrayopt": [...]}``: tensors, numbers and strings only."""
        groups, index = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k not in ("params", "opt")}
            packed["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            groups.append(packed)
        states = []
        for record in self._groups:
            if record.state is None:
                states.append(None)
                continue
            _check_not_consumed(record.state)
            leaf_state.settle(record.state)
            arrays: dict = {}
            tree = _encode(record.state, "", arrays)
            states.append({"counts": list(record.counts), "scale": record.rate.value, "tree": tree,
                           "arrays": {k: torch.from_numpy(a.copy()) for k, a in arrays.items()}})
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
        for gi, (group, saved, entry) in enumerate(zip(self.param_groups, saved_groups, saved_states)):
            n = len(group["params"])
            if len(saved["params"]) != n:
                raise ValueError(f"state_dict['param_groups'][{gi}]: holds {len(saved['params'])} params, "
                                 f"this optimizer's group has {n}")
            if entry is None:
                restored.append((None, [0] * n, None))
                continue
            if not isinstance(entry, dict) or "counts" not in entry or len(entry["counts"]) != n:
                raise ValueError(f"state_dict['arrayopt'][{gi}]: expected a state with one step count per param")
            record = self._groups[gi]
            like = record.group_opt.init({k: p.detach() for k, p in zip(_names(group), group["params"])})
            data = BytesArchive({k: t.numpy() for k, t in entry["arrays"].items()})
            try:
                state = decode(entry["tree"], like, data)
            except ValueError as e:
                raise ValueError(f"state_dict['arrayopt'][{gi}]: {e}") from None
            restored.append((state, [int(c) for c in entry["counts"]], float(entry["scale"])))
        for group, saved, record, (state, counts, scale) in zip(self.param_groups, saved_groups, self._groups,
                                                                restored):
            group.update({k: v for k, v in saved.items() if k != "params"})
            record.state, record.counts = state, counts
            if scale is not None and scale != record.rate.value:
                record.rate.value = scale
                record.group_opt = _group_optimizer(record.opt, record.rate, record.overrides)


def _max(counts) -> int:
    return max(counts, default=0)


def _order(units: list) -> list:
    """Units in the order that writes nothing unless every unit's gradients are finite: the
    units with a non-finite gradient first (their step raises, or skips), then the largest
    unit (its own step checks it before writing), then the rest, checked here beforehand."""
    if len(units) < 2:
        return units
    sizes = [sum(g.numel() for g in u[4].values()) for u in units]
    largest = max(range(len(units)), key=sizes.__getitem__)
    bad = [j for j, u in enumerate(units) if j != largest and not _finite(list(u[4].values()))]
    rest = [j for j in range(len(units)) if j not in bad and j != largest]
    return [units[j] for j in bad + [largest] + rest]


def _finite(grads) -> bool:
    """Whether every gradient is finite: one sum per gradient (no temporary tensors), exact when it
    passes; a sum that is not finite (a NaN/Inf, or an overflow) is decided element by element."""
    sums = torch.stack([g.sum().float() for g in grads])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(g).all()) for g in grads)


def _default_lr(opt: _ArrayoptOptimizer) -> float:
    rate = single_rate(opt)
    if rate is not None:
        return rate
    from .. import _validate

    lead = next(iter(own_rates(opt)), 1.0)
    return _validate.learning_rate_at(lead, 0)
