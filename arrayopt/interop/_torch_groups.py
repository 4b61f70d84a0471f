"""Param groups written as torch users write them, checked before the adapter adds them.

- ``betas=(β1, β2)`` is arrayopt's ``b1, b2``; ``lr``, ``eps``, ``weight_decay``,
  ``momentum`` and ``nesterov`` have the same names and meanings in both.
- torch options with no arrayopt counterpart (``amsgrad``, ``maximize``, ``foreach``,
  ``fused``, ``capturable``, ``differentiable``, ``dampening``, ``lr_decay``,
  ``decoupled_weight_decay``) are accepted at torch's default value (``foreach``/``fused``:
  ``None`` or ``False``), which is what arrayopt does, and refused by name otherwise.
- params: one tensor per group entry, never twice (also not through ``.detach()``
  or another view of the same memory), never a zero-stride (expanded) view.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TORCH_DEFAULTS", "torch_overrides", "check_param_tensors", "check_lr"]

#: torch options with no arrayopt counterpart, and the values under which they change nothing
TORCH_DEFAULTS = {"amsgrad": (False,), "maximize": (False,), "foreach": (None, False), "fused": (None, False),
                  "capturable": (False,), "differentiable": (False,), "dampening": (0, 0.0), "lr_decay": (0, 0.0),
                  "decoupled_weight_decay": (False,)}


def refuse_torch_only(group: dict, where: str) -> None:
    """Raise for a torch-only option set to anything but torch's default; drop the defaults."""
    for key, accepted in TORCH_DEFAULTS.items():
        if key in group:
            value = group.pop(key)
            if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
                raise ValueError(f"{where}[{key!r}]: torch's {key}={value!r} has no arrayopt counterpart "
                                 f"(accepted only as {' or '.join(map(repr, accepted))}, which change nothing)")


def torch_overrides(group: dict, names: set, where: str) -> dict:
    """The arrayopt hyperparameter overrides a group sets, ``betas`` read as ``b1, b2``."""
    out = {k: v for k, v in group.items() if k in names}
    if "betas" in group:
        if "b1" not in names or "b2" not in names:
            raise ValueError(f"{where}['betas']: the optimizer has no b1, b2 (torch's betas)")
        if "b1" in group or "b2" in group:
            raise ValueError(f"{where}: sets both 'betas' and 'b1'/'b2'; set one of them")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}['betas']: expected a pair (b1, b2), got {betas!r}")
        out["b1"], out["b2"] = betas
    return out


def check_lr(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}['lr']: expected a finite float >= 0, got {value!r}")
    return float(value)


def _span(t: torch.Tensor):
    """``(storage pointer, first byte, end byte)`` of the memory ``t`` reads."""
    size = t.element_size()
    extent = sum((d - 1) * s for d, s in zip(t.shape, t.stride())) + 1
    start = t.storage_offset() * size
    return t.untyped_storage().data_ptr(), start, start + extent * size


def check_param_tensors(new: list, new_names: list, old: list, old_names: list) -> None:
    """Refuse sparse, non-float or zero-stride params, and a param listed twice (the same tensor or
    overlapping memory), within the new group or against the groups already added."""
    for p, name in zip(new, new_names):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params {name}: expected a torch.Tensor, got {type(p).__name__}")
        if p.layout != torch.strided:
            raise TypeError(f"params {name}: layout {p.layout} is not supported (dense tensors only)")
        if not p.is_floating_point() or p.is_complex():
            raise TypeError(f"params {name}: dtype {p.dtype} is not a real floating dtype; arrayopt optimizes "
                            f"float16, bfloat16, float32 or float64 params")
        if p.numel() > 1 and any(s == 0 and d > 1 for d, s in zip(p.shape, p.stride())):
            raise ValueError(f"params {name}: has a zero stride {tuple(p.stride())} (an expanded view whose "
                             f"elements share memory); pass a tensor that owns its elements (.clone())")
    spans = []
    for p, name in list(zip(old, old_names)) + list(zip(new, new_names)):
        if p.numel() > 0:
            spans.append((*_span(p), name, p))
    spans.sort(key=lambda s: (s[0], s[1]))
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            what = "the same tensor" if a[4] is b[4] else "views of overlapping memory"
            raise ValueError(f"params {a[3]} and {b[3]}: {what} (listed twice, or tied weights through "
                             f".detach() or a view); list each param once, in one group")
