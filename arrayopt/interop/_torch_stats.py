r"""Eva's per-layer statistics for the torch adapter: fetched once per step, split by param group.

The source is a :class:`~arrayopt.interop.torch.KVCapture` or a callable returning statistics
keyed by weight (a param name as in ``named_parameters()``, or the tensor itself), with
``"bias"`` naming the bias the same way. Each group receives the entries of its weights that
have a gradient this step, keyed like the group's tree; a layer whose bias is not stepped with
it (another group, or no gradient) is given as a weight-only layer (``ā`` without its appended 1).

With ``KVCapture(..., accumulate="per_microbatch")`` an entry holds one ``(ā_k, ḡ_k)`` per
micro-batch; :func:`fold` turns them into the one value that gives Eva's running average
(E8) after ``k`` successive updates ``m ← ξ·m + (1−ξ)·v_k``:
``v = (m_k − ξ·m_0)/(1 − ξ)`` (``v = m_k`` when the layer has no average yet).
"""

from __future__ import annotations

import torch

from ..chain import Chain
from ..groups import Partition

__all__ = ["GroupStats", "needs_stats", "takes_stats"]


def takes_stats(opt) -> bool:
    if isinstance(opt, Chain):
        return any(takes_stats(p) for p in opt.parts)
    return bool(getattr(opt, "takes_stats", False)) and not isinstance(opt, Partition)


def needs_stats(opt) -> bool:
    """Whether ``opt`` (or a part of it) is Eva or Eva-f, which step without curvature when given no statistics."""
    if isinstance(opt, Chain):
        return any(needs_stats(p) for p in opt.parts)
    if isinstance(opt, Partition):
        return any(needs_stats(p) for p in opt.transforms.values())
    return bool(getattr(opt, "takes_stats", False)) and getattr(opt, "variant", None) != "eva_s"


def _eva_part(opt, state):
    """``(eva optimizer, its state)`` of ``opt`` alone or in a chain."""
    if isinstance(opt, Chain):
        for part, s in zip(opt.parts, state["inner"] if state is not None else [None] * len(opt.parts)):
            if getattr(part, "takes_stats", False):
                return part, s
    if getattr(opt, "takes_stats", False):
        return opt, state
    raise ValueError(f"stats: accumulate='per_microbatch' folds micro-batches into Eva's running average; "
                     f"{type(opt).__name__} has no Eva part (alone or in a chain)")


def fold(values: list, old, first: bool, decay: float):
    """The one statistic ``v`` whose update ``ξ·m_0 + (1−ξ)·v`` equals ``k`` successive updates."""
    m = values[0] if first else old
    for v in values[1 if first else 0:]:
        m = m * decay + v.to(m.dtype) * (1.0 - decay)
    if first or decay == 1.0:
        return m
    return (m - old * decay) / (1.0 - decay)


class _Fetched:
    """One step's statistics with the tensors their keys name."""

    def __init__(self, raw: dict, resolve):
        self.raw = raw
        self.resolve = resolve

    def for_group(self, params, names, idx, opt=None, state=None) -> dict:
        pos = {id(params[i]): i for i in idx}
        out = {}
        for key, entry in self.raw.items():
            w = self.resolve(key)
            i = pos.get(id(w))
            if i is None:
                continue
            entry = dict(entry)
            bias = entry.pop("bias", None)
            b = None if bias is None else pos.get(id(self.resolve(bias)))
            a, g = entry.get("a"), entry.get("g")
            if bias is not None and b is None:  # its bias steps apart: the weight alone
                a = [v[:-1] for v in a] if isinstance(a, list) else a[:-1]
            if isinstance(a, list):
                a, g = self._fold(opt, state, i, b is not None, a, g)
            new = {"a": a}
            if g is not None:
                new["g"] = g
            if b is not None:
                new["bias"] = names[b]
            out[names[i]] = new
        return out

    @staticmethod
    def _fold(opt, state, i, has_bias, a_list, g_list):
        eva, s = _eva_part(opt, state)
        first = s is None or s["kv_updates"][i] == 0
        old_a = old_g = None
        if not first:
            old_a = s["kv_a"][i] if has_bias else s["kv_a"][i][:-1]
            old_g = s["kv_g"][i] if "kv_g" in s else None
        a = fold(a_list, old_a, first, eva.stat_decay)
        g = fold(g_list, old_g, first, eva.stat_decay) if g_list else None
        return a, g


class GroupStats:
    """The adapter's statistics source (``None``: none given)."""

    def __init__(self, source):
        from ._torch_capture import KVCapture

        if source is not None and not isinstance(source, KVCapture) and not callable(source):
            raise TypeError(f"stats: expected a KVCapture or a callable returning statistics, "
                            f"got {type(source).__name__}")
        self.source = source
        self.given = source is not None
        self.capture = isinstance(source, KVCapture)

    def fetch(self, optimizer):
        """This step's statistics, not yet cleared from a capture (:meth:`consumed` does)."""
        if self.source is None:
            return None
        if self.capture:
            return _Fetched(self.source.stats(clear=False), self.source.tensor)
        raw = self.source()
        if not isinstance(raw, dict):
            raise TypeError(f"stats: the callable returned {type(raw).__name__}, expected a dict")
        by_name = {n: p for g in optimizer.param_groups
                   for n, p in zip(g.get("param_names") or [], g["params"])}

        def resolve(key):
            if isinstance(key, torch.Tensor):
                return key
            if key not in by_name:
                raise ValueError(f"stats[{key!r}]: not the name of a param (give named_parameters() to the "
                                 f"Optimizer, or key the statistics by tensor)")
            return by_name[key]

        for key, entry in raw.items():
            resolve(key)
            if isinstance(entry, dict) and entry.get("bias") is not None:
                resolve(entry["bias"])
        return _Fetched(raw, resolve)

    def consumed(self, fetched) -> None:
        if self.capture and fetched is not None:
            self.source.clear()
