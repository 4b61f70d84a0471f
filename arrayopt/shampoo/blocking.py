"""Shape handling: merge small dims, split large dims into blocks, and put blocks back.

- :func:`merge_small_dims` (JAX's rule): scan left to right with a running
  product; ``[1,2,512,1,2048,1,3,4]`` at 1024 gives ``[1024, 2048, 12]``.
- :func:`block_slices`: every axis longer than ``block_size`` is cut into
  chunks of ``block_size`` (the last one holds the remainder); blocks are the
  Cartesian product of the chunks, first axis outermost.
- :func:`split` / :func:`merge` cut an array into those blocks and back
  (``merge(split(x)) == x`` exactly).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

__all__ = ["merge_small_dims", "block_slices", "split", "merge", "LeafPlan", "plan_leaf"]


def merge_small_dims(shape, max_dim: int) -> tuple:
    """Merge neighbouring dims while their product stays ``<= max_dim``; drop size-1 dims.

    All-ones (and scalar) shapes give ``(1,)``.
    """
    shape = tuple(int(d) for d in shape)
    if all(d == 1 for d in shape):
        return (1,)
    out = []
    prod = 1
    for d in shape:
        if prod * d <= max_dim:
            prod *= d
        else:
            if prod > 1:
                out.append(prod)
            prod = d
    if prod > 1:
        out.append(prod)
    return tuple(out)


def _chunks(d: int, b: int):
    return [(s, min(s + b, d)) for s in range(0, d, b)]


def block_slices(shape, block_size: int) -> list:
    """Per-block tuples of ``(start, stop)`` per axis, first axis outermost."""
    per_axis = [_chunks(d, block_size) for d in shape]
    return [tuple(c) for c in itertools.product(*per_axis)]


def split(xp, x, blocks) -> list:
    """The blocks of ``x`` (views where the namespace gives views)."""
    if len(blocks) == 1:
        return [x]
    return [x[tuple(slice(a, b) for a, b in blk)] for blk in blocks]


def merge(xp, parts, shape, block_size: int):
    """Inverse of :func:`split`: concatenate the blocks back into ``shape``."""
    if len(parts) == 1:
        return parts[0]
    counts = [len(_chunks(d, block_size)) for d in shape]

    def build(axis, items):
        if axis == len(shape) - 1:
            return xp.concat(items, axis=axis) if len(items) > 1 else items[0]
        stride = len(items) // counts[axis]
        subs = [build(axis + 1, items[i * stride:(i + 1) * stride]) for i in range(counts[axis])]
        return xp.concat(subs, axis=axis) if len(subs) > 1 else subs[0]

    return build(0, list(parts))


@dataclass(frozen=True)
class LeafPlan:
    """How one parameter is preconditioned.

    ``skipped``: no Shampoo (the grafting direction is used); ``shape``: the
    merged shape; ``blocks``: block slices of the merged shape; ``dims``: per
    block, the sizes of the preconditioned axes (one factor each); ``mask``: which
    axes of a block are preconditioned; ``exponent``: ``p`` of every factor.
    """

    skipped: bool
    shape: tuple
    blocks: tuple
    mask: tuple
    exponent: int

    def factor_shapes(self) -> list:
        """Per block, the list of factor shapes ``(d, d)``."""
        if self.skipped:
            return []
        return [[(b - a, b - a) for (a, b), m in zip(blk, self.mask) if m] for blk in self.blocks]

    def block_shapes(self) -> list:
        """The shape of every block (empty for a skipped parameter)."""
        if self.skipped:
            return []
        return [tuple(b - a for a, b in blk) for blk in self.blocks]


def plan_leaf(shape, cfg) -> LeafPlan:
    """The :class:`LeafPlan` of a parameter of ``shape`` under config ``cfg``."""
    shape = tuple(int(d) for d in shape)
    rank = len(shape)
    too_big = cfg.skip_preconditioning_dim_size_gt is not None and any(
        d > cfg.skip_preconditioning_dim_size_gt for d in shape)
    if rank < cfg.skip_preconditioning_rank_lt or too_big or 0 in shape:
        return LeafPlan(True, shape, (), (), 0)
    merged = merge_small_dims(shape, cfg.merge_threshold)
    k = len(merged)
    if k == 1 or cfg.preconditioner_type == "all":
        mask = (True,) * k
    elif cfg.preconditioner_type == "input":
        mask = (True,) * (k - 1) + (False,)
    else:  # output
        mask = (False,) * (k - 1) + (True,)
    n_pre = sum(mask)
    exponent = cfg.exponent_override or 2 * n_pre
    blocks = tuple(block_slices(merged, cfg.block_size))
    return LeafPlan(False, merged, blocks, mask, exponent)
