"""``transform(opt)``: any arrayopt optimizer as an ``optax.GradientTransformation``.

>>> import jax, jax.numpy as jnp, optax, arrayopt as ao
>>> from arrayopt.interop.optax import transform
>>> tx = optax.chain(optax.clip_by_global_norm(1.0), transform(ao.sonew(1e-2, band=1)))
>>> params = {"w": jnp.ones((4, 3))}
>>> state = tx.init(params)
>>> @jax.jit
... def train_step(params, state):
...     grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
...     updates, state = tx.update(grads, state, params)
...     return optax.apply_updates(params, updates), state
>>> params, state = train_step(params, state)

The state is a pytree of JAX arrays (:class:`TransformState`): every array of the arrayopt
state, and its Python numbers (the step ``count`` among them) as 0-d arrays; its strings
and ``None`` entries (the optimizer's name, the params' leaf paths) are static pytree data.
So a jitted step traces once and keeps one compiled executable.

Two ways the update runs inside a jitted step:

- **traced** (SGD, Adam/AdamW, AdaGrad, SONew, ``scale``, ``clip_by_global_norm``, Shampoo
  with synchronous ``eigh`` roots, and any ``ao.chain`` whose parts all trace: see
  :func:`arrayopt.interop._optax_traced.traces`): the optimizer's array-API reference in JAX,
  traced into the caller's step, on the caller's device, with no host callback. The step
  count is a traced 0-d array; the learning rate (a float, an ``ao.schedules`` schedule or an
  optax schedule) and the bias corrections are computed from it by array ops in the params'
  compute dtype (which all leaves must share, else the host path runs); Shampoo refreshes its
  roots under ``jax.lax.cond`` on the count, one ``eigh`` group at a time. A non-finite
  gradient skips the step (state and params unchanged, ``nonfinite_skipped`` counts it),
  since a traced step cannot raise.
- **host** (every other optimizer: partitions, masks, Sketchy, Eva, Shampoo with Newton or
  QR roots, eigenvalue correction or a communicator, a chain with such a part; any optimizer
  with ``host=True``): ``opt.update`` runs on the host through ``jax.pure_callback``, the NumPy
  path, with the gradients, params, state (and statistics) copied to host memory and the
  updates and new state copied back. Results are those of the same optimizer on NumPy
  (errors raise from the callback).

Eva and Eva-f precondition from per-layer statistics: the transformation is an
``optax.GradientTransformationExtraArgs`` and takes them as ``update(grads, state, params,
stats=stats)`` (``optax.chain`` passes the keyword on), e.g. from
:func:`arrayopt.interop.jax.loss_grads_and_stats`::

    from arrayopt.interop.jax import loss_grads_and_stats

    def loss_fn(params, x, y, capture):
        h = jnp.tanh(capture("w1", x, x @ params["w1"] + params["b1"], bias="b1"))
        out = capture("w2", h, h @ params["w2"])
        return jnp.mean((out - y) ** 2)

    tx = transform(ao.eva(0.1, weight_layout="in_out"))

    @jax.jit
    def train_step(params, state, x, y):
        loss, grads, stats = loss_grads_and_stats(loss_fn, params, x, y)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, loss

An update of Eva or Eva-f without ``stats`` raises a ``ValueError`` (it would otherwise step as
SGD with momentum); ``stats`` given to an optimizer that takes none (Eva-s among them) raises a
``TypeError``.

A Shampoo with an executor or ``root_delay > 0`` is rejected (its pending root job cannot be
carried from step to step). A schedule that cannot take an array (Python math on its step)
is evaluated on the host through a ``jax.pure_callback`` of the count, the rest still traced.
Pytrees of dicts, lists and tuples keep their structure (and leaf paths in error
messages); any other pytree reaches the optimizer as the list of its leaves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _tree
from ..base import Optimizer
from ..chain import Chain
from ._optax_traced import check_carriable, needs_params, traced_update, traces

__all__ = ["needs_stats", "transform", "TransformState"]


@jax.tree_util.register_pytree_node_class
class TransformState:
    """The arrayopt state as a pytree: ``leaves`` (JAX arrays) and a static ``skeleton``."""

    def __init__(self, leaves, skeleton):
        self.leaves = tuple(leaves)
        self.skeleton = skeleton

    def tree_flatten(self):
        return self.leaves, self.skeleton

    @classmethod
    def tree_unflatten(cls, skeleton, leaves):
        return cls(leaves, skeleton)

    @property
    def count(self):
        """The number of steps taken (a 0-d integer array)."""
        return self.leaves[_count_position(self.skeleton)]

    def as_state(self) -> dict:
        """The arrayopt state (its numbers as 0-d JAX arrays), e.g. to read Shampoo's root counters."""
        return _join(self.skeleton, self.leaves, host=False)


def _split(node):
    """``(dynamic leaves, skeleton)``: arrays and Python numbers are leaves; strings and None are static."""
    leaves: list = []

    def walk(x):
        if isinstance(x, dict):
            return ("dict", type(x), tuple(x), tuple(walk(v) for v in x.values()))
        if isinstance(x, (list, tuple)):
            return ("list" if isinstance(x, list) else "tuple", tuple(walk(v) for v in x))
        if isinstance(x, (str, type(None))):
            return ("static", x)
        kind = "bool" if isinstance(x, bool) else "int" if isinstance(x, int) else \
            "float" if isinstance(x, float) else "array"
        leaves.append(x)
        return (kind,)

    return leaves, walk(node)


def _join(skeleton, leaves, host: bool = True):
    """Inverse of :func:`_split`: with host (NumPy) arrays and Python numbers, or (``host=False``)
    with the JAX arrays as they are (numbers stay 0-d arrays, as traced values must)."""
    it = iter(leaves)

    def build(sk):
        kind = sk[0]
        if kind == "dict":
            return sk[1](zip(sk[2], (build(c) for c in sk[3])))
        if kind in ("list", "tuple"):
            kids = [build(c) for c in sk[1]]
            return kids if kind == "list" else tuple(kids)
        if kind == "static":
            return sk[1]
        x = next(it)
        if not host:
            return x
        if kind == "array":
            return np.array(x)  # a writeable copy: the state passed to update() is consumed
        return {"bool": bool, "int": int, "float": float}[kind](x)

    return build(skeleton)


def _dynamic_leaves(skeleton, node) -> list:
    """The dynamic leaves of ``node`` (traced values) in the order of ``skeleton``; raises if the
    containers or static entries differ from it."""
    out: list = []

    def walk(sk, x):
        kind = sk[0]
        if kind == "dict":
            if not isinstance(x, dict) or tuple(x) != sk[2]:
                raise ValueError("state: the keys of the state changed during the step")
            for v, c in zip(x.values(), sk[3]):
                walk(c, v)
        elif kind in ("list", "tuple"):
            if not isinstance(x, (list, tuple)) or len(x) != len(sk[1]):
                raise ValueError("state: a list in the state changed length during the step")
            for v, c in zip(x, sk[1]):
                walk(c, v)
        elif kind == "static":
            if x != sk[1]:
                raise ValueError(f"state: the entry {sk[1]!r} changed to {x!r} during the step")
        else:
            out.append(x)

    walk(skeleton, node)
    return out


def _count_position(skeleton) -> int:
    """The index among the dynamic leaves of the top-level ``count`` entry."""
    _, _, keys, kids = skeleton
    position = 0
    for key, kid in zip(keys, kids):
        if key == "count":
            return position
        position += len(_split_positions(kid))
    raise KeyError("count")


def _split_positions(sk) -> list:
    if sk[0] == "dict":
        return [p for c in sk[3] for p in _split_positions(c)]
    if sk[0] in ("list", "tuple"):
        return [p for c in sk[1] for p in _split_positions(c)]
    return [] if sk[0] == "static" else [sk[0]]


def xp_cast(x, like):
    """``x`` as a JAX array of ``like``'s dtype (the state keeps its dtypes from step to step)."""
    return jnp.asarray(x, dtype=like.dtype)


def _host_tree(treedef, leaves):
    """The pytree rebuilt from host leaves, if it is made of dicts, lists and tuples; else the list."""
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    return tree if len(_tree.flatten(tree)[0]) == len(leaves) else list(leaves)


def _specs(leaves):
    return [jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)
            for x in leaves]


def needs_stats(opt) -> bool:
    """Whether ``opt`` (or a part of a chain) steps from per-layer statistics (Eva, Eva-f)."""
    if isinstance(opt, Chain):
        return any(needs_stats(part) for part in opt.parts)
    return bool(getattr(opt, "takes_stats", False)) and getattr(opt, "variant", None) != "eva_s"


def _check_stats_given(opt, stats) -> None:
    """Raise if ``opt`` needs statistics and ``stats`` is None, or takes none and got some."""
    if stats is None and needs_stats(opt):
        raise ValueError(
            f"stats: {opt.name} preconditions from per-layer statistics and got none; pass them to "
            f"update(grads, state, params, stats=...), e.g. from "
            f"arrayopt.interop.jax.loss_grads_and_stats (else it would step as SGD with momentum)")
    if stats is not None and not needs_stats(opt):
        raise TypeError(f"stats: {opt.name} takes no per-layer statistics; call update() without stats=")


def transform(opt: Optimizer, *, host: bool = False) -> optax.GradientTransformationExtraArgs:
    """``opt`` (any arrayopt optimizer, chains and partitions included) as an optax transformation.

    ``host=True`` runs every optimizer on the host (see the module docstring for the two paths).
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt: expected an arrayopt optimizer, got {type(opt).__name__}")
    if not isinstance(host, bool):
        raise TypeError(f"host: expected a bool, got {type(host).__name__}")
    check_carriable(opt)

    def init_host(leaves, treedef):
        state = opt.init(_host_tree(treedef, [np.array(x) for x in leaves]))
        return _split(state)

    def init_fn(params):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if not any(isinstance(x, jax.core.Tracer) for x in leaves):
            flat, skeleton = init_host(leaves, treedef)
            # strongly typed 0-d arrays for the Python numbers, as the jitted step returns them
            # (a weakly typed count would retrace the step once)
            return TransformState([jnp.asarray(np.asarray(x)) for x in flat], skeleton)
        # traced params (init inside jit): the structure from zeros of the same shapes, the values on the host
        zeros = [np.zeros(x.shape, x.dtype) for x in leaves]
        flat, skeleton = init_host(zeros, treedef)
        specs = _specs([jnp.asarray(np.asarray(x)) for x in flat])
        out = jax.pure_callback(lambda *ls: [np.asarray(a, s.dtype) for a, s in
                                             zip(init_host(ls, treedef)[0], specs)], specs, *leaves)
        return TransformState(out, skeleton)

    def update_fn(updates, state, params=None, *, stats=None, **extra_args):
        if not isinstance(state, TransformState):
            raise TypeError(f"state: expected the TransformState returned by init(), got {type(state).__name__}")
        _check_stats_given(opt, stats)
        g_leaves, treedef = jax.tree_util.tree_flatten(updates)
        p_leaves = [] if params is None else jax.tree_util.tree_leaves(params)
        if params is not None and len(p_leaves) != len(g_leaves):
            raise ValueError(f"params: {len(p_leaves)} leaves, but the updates have {len(g_leaves)}")
        skeleton, n = state.skeleton, len(g_leaves)
        if not host and traces(opt):
            if params is None and needs_params(opt):
                raise ValueError(f"params: {opt.name} with weight decay needs the params in update()")
            traced = traced_update(opt, g_leaves, p_leaves, _join(skeleton, state.leaves, host=False))
            if traced is not None:
                updates, new = traced
                out = [xp_cast(x, old) for x, old in zip(_dynamic_leaves(skeleton, new), state.leaves)]
                return jax.tree_util.tree_unflatten(treedef, updates), TransformState(out, skeleton)
        u_specs = _specs(g_leaves)
        s_specs = _specs(state.leaves)
        st_leaves, st_skeleton = _split(stats)
        m = len(p_leaves) + len(state.leaves)

        def on_host(*arrays):
            g = _host_tree(treedef, [np.asarray(x) for x in arrays[:n]])
            p = None if params is None else _host_tree(treedef, [np.asarray(x) for x in arrays[n:2 * n]])
            s = _join(skeleton, arrays[2 * n if params is not None else n:n + m])
            kw = {} if stats is None else {"stats": _join(st_skeleton, arrays[n + m:])}
            u, new = opt.update(g, s, p, **kw)
            flat, new_skeleton = _split(new)
            if new_skeleton != skeleton:
                raise ValueError(f"state: the structure of {opt.name}'s state changed during the step; "
                                 f"it cannot be carried through a jitted optax step")
            u_flat = _tree.flatten(u)[0]
            return ([np.asarray(x, s.dtype) for x, s in zip(u_flat, u_specs)],
                    [np.asarray(x, s.dtype) for x, s in zip(flat, s_specs)])

        u_out, s_out = jax.pure_callback(on_host, (u_specs, s_specs), *g_leaves, *p_leaves, *state.leaves,
                                         *st_leaves)
        return jax.tree_util.tree_unflatten(treedef, u_out), TransformState(s_out, skeleton)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
