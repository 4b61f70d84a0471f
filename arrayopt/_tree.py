"""Flatten and unflatten parameter trees.

A tree is an array (a single leaf), or a ``dict``/``list``/``tuple`` whose values
are trees. Dict keys keep their insertion order. Each leaf carries a path string
such as ``"['layer1']['w']"`` or ``"[0]"`` (``"<root>"`` for a bare array) that
error messages use to name the offending leaf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TreeDef", "flatten", "unflatten"]


@dataclass(frozen=True)
class TreeDef:
    """Structure of a tree: ``kind`` is "leaf", "dict", "list" or "tuple"."""

    kind: str
    keys: tuple = ()
    children: tuple = ()

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        return sum(c.num_leaves for c in self.children)


_LEAF = TreeDef("leaf")


def flatten(tree: Any) -> tuple[list, TreeDef, list[str]]:
    """Return ``(leaves, treedef, paths)`` for ``tree`` (depth first, in order)."""
    leaves: list = []
    paths: list[str] = []

    def walk(node: Any, path: str) -> TreeDef:
        if isinstance(node, dict):
            keys = tuple(node.keys())
            kids = tuple(walk(node[k], f"{path}[{k!r}]") for k in keys)
            return TreeDef("dict", keys, kids)
        if isinstance(node, (list, tuple)):
            kids = tuple(walk(v, f"{path}[{i}]") for i, v in enumerate(node))
            return TreeDef("list" if isinstance(node, list) else "tuple", (), kids)
        leaves.append(node)
        paths.append(path or "<root>")
        return _LEAF

    treedef = walk(tree, "")
    return leaves, treedef, paths


def unflatten(treedef: TreeDef, leaves: list) -> Any:
    """Inverse of :func:`flatten`."""
    it = iter(leaves)

    def build(td: TreeDef) -> Any:
        if td.kind == "leaf":
            return next(it)
        kids = [build(c) for c in td.children]
        if td.kind == "dict":
            return dict(zip(td.keys, kids))
        if td.kind == "list":
            return kids
        return tuple(kids)

    out = build(treedef)
    return out
