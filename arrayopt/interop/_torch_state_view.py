"""``optimizer.state`` of the torch adapter: each param's state tensors, read from the arrayopt state.

The view is rebuilt on each access (``optimizer.state[p]`` builds a new dict): the arrayopt
state is the one copy, so nothing can fall out of sync. A param that has not stepped yet maps
to ``{}``, as in ``torch.optim``'s ``defaultdict``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import _leaf_state as leaf_state

__all__ = ["StateView"]


class StateView(Mapping):
    """``{param: {name: tensor, ..., "step": tensor}}`` over the params that have a state."""

    def __init__(self, optimizer):
        self._optimizer = optimizer

    def _where(self):
        out = {}
        for group, record in zip(self._optimizer.param_groups, self._optimizer._groups):
            if record.state is None:
                continue
            for i, p in enumerate(group["params"]):
                out[p] = (record, i)
        return out

    def __getitem__(self, param):
        found = self._where().get(param)
        if found is None:
            return {}
        record, i = found
        entries = leaf_state.leaf_entries(record.group_opt, record.state, i)
        entries["step"] = torch.tensor(float(record.counts[i]))
        return entries

    def __iter__(self):
        return iter(self._where())

    def __len__(self):
        return len(self._where())

    def __contains__(self, param):
        return param in self._where()
