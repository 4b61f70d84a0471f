"""Flatten and unflatten parameter trees; match a second tree to the first by key.

A tree is an array (a single leaf) or a container whose values are trees:

- a ``dict`` or any other ``collections.abc.Mapping`` (``flax.core.FrozenDict``...): its leaf
  order is its own key order (insertion order for a dict), so the leaves of the params keep
  the order they were given in, and states saved before stay loadable;
- a ``list``, a ``tuple`` or a ``NamedTuple`` (rebuilt as the same class);
- when JAX is imported, any other node registered with ``jax.tree_util`` (dataclasses from
  ``jax.tree_util.register_dataclass``, ``flax.struct.dataclass``...), flattened one level by
  JAX's own registry and rebuilt by it.

Everything else is a leaf. Each leaf carries a path string such as ``"['layer1']['w']"`` or
``"[0]"`` (``"<root>"`` for a bare array) that error messages use to name the offending leaf.

A second tree (grads, updates) is matched to the params by key (:func:`flatten_like`): a
mapping with the same keys in another order is the same tree, as in JAX and Python; a real
mismatch names the missing and the extra keys. The params themselves are matched to the leaf
order their state was made with (:func:`in_order`): params whose mappings list the same keys in
another order (``jax.tree_util.tree_map`` sorts dict keys) step the same leaves, and the trees
an optimizer returns list their keys in the state's order.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["TreeDef", "flatten", "flatten_like", "in_order", "unflatten"]


@dataclass(frozen=True)
class TreeDef:
    """Structure of a tree: ``kind`` is "leaf", "dict", "list", "tuple", "namedtuple" or
    "pytree" (a JAX-registered node); ``node`` is the container's class (a mapping or a
    NamedTuple class) or, for "pytree", JAX's one-level tree structure."""

    kind: str
    keys: tuple = ()
    children: tuple = ()
    node: Any = None

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        return sum(c.num_leaves for c in self.children)


_LEAF = TreeDef("leaf")


def _is_namedtuple(node) -> bool:
    return isinstance(node, tuple) and hasattr(type(node), "_fields")


def _jax_children(node):
    """``(children, one-level structure)`` of a node registered with ``jax.tree_util``, else None.

    JAX is consulted only when the caller already imported it."""
    jax = sys.modules.get("jax")
    if jax is None or node is None:
        return None
    tu = jax.tree_util
    if tu.default_registry.flatten_one_level(node) is None:
        return None
    structure = tu.tree_structure(node, is_leaf=lambda x: x is not node)
    if structure.num_nodes == 1:  # registered but with no children: not a container of params
        return None
    return tu.tree_leaves(node, is_leaf=lambda x: x is not node), structure


#: array types already seen as leaves (NumPy, torch, JAX, CuPy, array-api-strict arrays are never
#: containers): their leaves skip the container checks. An immutable set, replaced whole when a
#: type is added (one atomic rebinding): threads flattening at once read one set or the next
_ARRAY_TYPES: frozenset = frozenset()
_ARRAY_MODULES = frozenset({"numpy", "torch", "jax", "jaxlib", "cupy", "array_api_strict"})


def _node(node: Any):
    """``(kind, keys, children, class or structure)`` of a container, or ``None`` for a leaf."""
    global _ARRAY_TYPES
    t = type(node)
    if t in _ARRAY_TYPES:
        return None
    got = _container(node)
    if got is None and t.__module__.partition(".")[0] in _ARRAY_MODULES:
        _ARRAY_TYPES = _ARRAY_TYPES | {t}  # a lost race only drops a memo entry, re-added next time
    return got


def _container(node: Any):
    if isinstance(node, Mapping):
        keys = tuple(node.keys())
        return "dict", keys, [node[k] for k in keys], None if type(node) is dict else type(node)
    if isinstance(node, list):
        return "list", (), list(node), None
    if _is_namedtuple(node):
        return "namedtuple", (), list(node), type(node)
    if isinstance(node, tuple):
        return "tuple", (), list(node), None
    got = _jax_children(node)
    if got is not None:
        return "pytree", (), got[0], got[1]
    return None


def _child_path(path: str, kind: str, keys: tuple, i: int) -> str:
    return f"{path}[{keys[i]!r}]" if kind == "dict" else f"{path}[{i}]"


def flatten(tree: Any) -> tuple[list, TreeDef, list[str]]:
    """Return ``(leaves, treedef, paths)`` for ``tree`` (depth first, in order)."""
    leaves: list = []
    paths: list[str] = []

    def walk(node: Any, path: str) -> TreeDef:
        got = _node(node)
        if got is None:
            leaves.append(node)
            paths.append(path or "<root>")
            return _LEAF
        kind, keys, kids, cls = got
        return TreeDef(kind, keys, tuple(walk(v, _child_path(path, kind, keys, i)) for i, v in enumerate(kids)),
                       cls)

    treedef = walk(tree, "")
    return leaves, treedef, paths


def _kind_name(td: TreeDef) -> str:
    if td.kind == "leaf":
        return "an array"
    if td.kind in ("namedtuple", "pytree") or (td.kind == "dict" and td.node is not None):
        name = td.node.__name__ if td.kind != "pytree" else str(td.node)
        return f"a {td.kind} {name}"
    return f"a {td.kind}"


def flatten_like(tree: Any, treedef: TreeDef, arg: str = "grads", ref_arg: str = "params") -> list:
    """The leaves of ``tree`` in the leaf order of ``treedef`` (the params'), matched by key.

    Mappings match by key whatever their order or class; lists, tuples, NamedTuples and
    JAX-registered nodes match by position and must have the same kind, class and length.
    Raises ``ValueError`` ("tree structure differs") naming the path and the missing and extra
    keys (or the kinds and lengths) where the trees differ.
    """
    leaves: list = []

    def differs(where: str, what: str) -> ValueError:
        return ValueError(f"{arg}: tree structure differs from {ref_arg} at {where}: {what}")

    def walk(node: Any, td: TreeDef, path: str) -> None:
        where = path or "<root>"
        got = _node(node)
        if td.kind == "leaf":
            if got is not None:
                raise differs(where, f"a {got[0]} where {ref_arg} has an array")
            leaves.append(node)
            return
        if got is None:
            raise differs(where, f"a {type(node).__name__} leaf where {ref_arg} has {_kind_name(td)}")
        kind, keys, kids, cls = got
        if td.kind == "dict":
            if kind != "dict":
                raise differs(where, f"a {kind} where {ref_arg} has a mapping")
            if set(keys) != set(td.keys):
                missing = [k for k in td.keys if k not in node]
                extra = [k for k in keys if k not in set(td.keys)]
                raise differs(where, f"missing keys {missing}, extra keys {extra}")
            for k, child in zip(td.keys, td.children):
                walk(node[k], child, f"{path}[{k!r}]")
            return
        if kind != td.kind or cls != td.node:
            name = "" if cls is None else " " + str(getattr(cls, "__name__", cls))
            raise differs(where, f"a {kind}{name} where {ref_arg} has {_kind_name(td)}")
        if len(kids) != len(td.children):
            raise differs(where, f"{len(kids)} entries where {ref_arg} has {len(td.children)}")
        for i, (v, child) in enumerate(zip(kids, td.children)):
            walk(v, child, f"{path}[{i}]")

    walk(tree, treedef, "")
    return leaves


def unflatten(treedef: TreeDef, leaves: list) -> Any:
    """Inverse of :func:`flatten`: the same containers (classes included) around ``leaves``."""
    it = iter(leaves)

    def build(td: TreeDef) -> Any:
        if td.kind == "leaf":
            return next(it)
        kids = [build(c) for c in td.children]
        if td.kind == "dict":
            d = dict(zip(td.keys, kids))
            return d if td.node is None else td.node(d)
        if td.kind == "list":
            return kids
        if td.kind == "namedtuple":
            return td.node(*kids)
        if td.kind == "pytree":
            return sys.modules["jax"].tree_util.tree_unflatten(td.node, kids)
        return tuple(kids)

    return build(treedef)


def _paths(treedef: TreeDef) -> list:
    out: list = []

    def walk(td: TreeDef, path: str) -> None:
        if td.kind == "leaf":
            out.append(path or "<root>")
            return
        for i, child in enumerate(td.children):
            walk(child, _child_path(path, td.kind, td.keys, i))

    walk(treedef, "")
    return out


def in_order(tree: Any, treedef: TreeDef, paths: list, order) -> tuple[list, TreeDef, list] | None:
    """``(leaves, treedef, paths)`` of ``tree`` with its mappings' keys put in the leaf order
    ``order`` (a state's ``param_paths``), or ``None`` when no reordering of mapping keys gives
    that order (other leaves, or lists in another order)."""
    rank = {p: i for i, p in enumerate(order)}
    if len(rank) != len(paths) or set(paths) != set(rank):
        return None

    def walk(td: TreeDef, path: str) -> tuple:
        if td.kind == "leaf":
            return td, rank[path or "<root>"]
        kids = [walk(c, _child_path(path, td.kind, td.keys, i)) for i, c in enumerate(td.children)]
        first = min((r for _, r in kids), default=len(rank))
        if td.kind != "dict":
            return TreeDef(td.kind, td.keys, tuple(k for k, _ in kids), td.node), first
        idx = sorted(range(len(kids)), key=lambda i: kids[i][1])
        return TreeDef("dict", tuple(td.keys[i] for i in idx), tuple(kids[i][0] for i in idx), td.node), first

    new = walk(treedef, "")[0]
    new_paths = _paths(new)
    if new_paths != list(order):
        return None
    return flatten_like(tree, new), new, new_paths
