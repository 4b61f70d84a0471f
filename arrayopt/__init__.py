"""arrayopt: memory-efficient second-order optimizers on any array-API namespace.

>>> import numpy as np, arrayopt as ao
>>> params = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
>>> opt = ao.adam(learning_rate=1e-3)
>>> state = opt.init(params)
>>> grads = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}
>>> params, state = opt.step(params, grads, state)
>>> state["count"]
1

The state passed to ``update``/``step`` is consumed (fused kernels update its arrays in
place), and so is every shallow copy of it (``dict(state)``): stepping one of them again
raises a ``ValueError``, as does stepping one state from two threads at once. To keep a
state to step from later, take ``ao.copy_state(state)``: a deep copy of its arrays with a
use token of its own.
"""

from __future__ import annotations

import os as _os
import sys as _sys


class _CheckoutBackends:
    """Finds ``arrayopt.backends`` in a source checkout, where it is the top-level
    ``backends/`` folder (an installed wheel has it inside the package, through the
    ``package-dir`` mapping of ``pyproject.toml``).

    It answers for that one name only: submodules are found through the package's own
    ``__path__``, and nothing else of the checkout (``tests``, ``asv_bench``) becomes part
    of ``arrayopt``. It sits first on ``sys.meta_path`` so that an editable install of
    another checkout cannot supply a different ``backends/``.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "arrayopt.backends":
            return None
        owner = _sys.modules.get("arrayopt")
        if owner is None or _os.path.dirname(_os.path.abspath(owner.__file__)) != _here:
            return None  # some other arrayopt is imported: not ours to answer for
        import importlib.util

        return importlib.util.spec_from_file_location(
            fullname, _os.path.join(self.folder, "__init__.py"),
            submodule_search_locations=[self.folder])


_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout_backends = _os.path.join(_os.path.dirname(_here), "backends")
if not _os.path.isdir(_os.path.join(_here, "backends")) and _os.path.isfile(
        _os.path.join(_checkout_backends, "__init__.py")):
    if not any(type(f).__name__ == "_CheckoutBackends" and getattr(f, "folder", None) == _checkout_backends
               for f in _sys.meta_path):
        _sys.meta_path.insert(0, _CheckoutBackends(_checkout_backends))

from . import dispatch, interop, registry, schedules  # noqa: E402
from ._state_use import copy_state  # noqa: E402
from .base import Optimizer  # noqa: E402
from .chain import apply_updates, chain  # noqa: E402
from .eva import eva  # noqa: E402
from .explain import explain  # noqa: E402
from .first_order import adagrad, adam, adamw, sgd  # noqa: E402
from .groups import masked, partition  # noqa: E402
from .shampoo import shampoo  # noqa: E402
from .sketchy import sketchy  # noqa: E402
from .sonew import sonew  # noqa: E402
from .state_io import load_state, save_state, state_nbytes  # noqa: E402
from .transforms import clip_by_global_norm, scale  # noqa: E402

__version__ = "0.1.0"


def backends_available() -> list:
    """Names of the active backends, every registered one included (:func:`arrayopt.dispatch.available`)."""
    return dispatch.available()


__all__ = [
    "Optimizer",
    "adagrad",
    "adam",
    "adamw",
    "apply_updates",
    "backends_available",
    "chain",
    "clip_by_global_norm",
    "copy_state",
    "dispatch",
    "eva",
    "explain",
    "interop",
    "load_state",
    "masked",
    "partition",
    "registry",
    "save_state",
    "scale",
    "schedules",
    "sgd",
    "shampoo",
    "sketchy",
    "sonew",
    "state_nbytes",
]

registry.register("sgd", lambda **kw: sgd(**{"learning_rate": 0.01, "momentum": 0.9, "nesterov": True, **kw}),
                  "SGD with Nesterov momentum 0.9")
registry.register("adam", lambda **kw: adam(**{"learning_rate": 3e-3, **kw}), "Adam")
registry.register("adamw", lambda **kw: adamw(**{"learning_rate": 3e-3, "weight_decay": 0.05, **kw}),
                  "AdamW (decoupled weight decay 0.05)")
registry.register("adagrad", lambda **kw: adagrad(**{"learning_rate": 0.01, **kw}), "AdaGrad")
registry.register("sonew_diag", lambda **kw: sonew(**{"learning_rate": 3e-3, "band": 0, **kw}),
                  "diag-SONew (m/(v+eps), Adam graft)")
registry.register("sonew_tridiag", lambda **kw: sonew(**{"learning_rate": 1e-2, "band": 1, **kw}),
                  "tridiagonal SONew (Adam graft)")
registry.register("sonew_band4", lambda **kw: sonew(**{"learning_rate": 1e-2, "band": 4, **kw}),
                  "band-4 SONew (Adam graft)")
registry.register("shampoo", lambda **kw: shampoo(**{"learning_rate": 3e-3, "block_size": 128, "ema_momentum": True,
                                                       "precondition_every": 10, "start_preconditioning_step": 10,
                                                       **kw}),
                  "Shampoo (block 128, Adam grafting, f64 eigh roots every 10 steps)")
registry.register("sketchy", lambda **kw: sketchy(**{"learning_rate": 3e-3, "rank": 32, "update_every": 10,
                                                       "graft": "adam", "ema_momentum": True, **kw}),
                  "Sketchy (S-Shampoo rank 32, sketches every 10 steps, Adam grafting)")
registry.register("shampoo_ec", lambda **kw: shampoo(**{"learning_rate": 3e-3, "block_size": 128, "ema_momentum": True,
                                                          "precondition_every": 10, "start_preconditioning_step": 10,
                                                          "preconditioner": "eigenvalue_corrected", "root_method": "qr",
                                                          "eps": 1e-8, **kw}),
                  "eigenvalue-corrected Shampoo (SOAP-style; block 128, Adam grafting, QR eigenbases every 10 steps)")
# the main job's MLP computes y = x @ W (weights (d_in, d_out)) and passes its layer statistics
# Eva's and Eva-f's rates: the best of asv_bench/scripts/tune_main_job.py's grid on the main job
for _variant, _lr, _what in (("eva", 3e-4, "Eva (Kronecker vectors from the backward pass, KL clip 1e-3)"),
                             ("eva_f", 1e-4, "Eva-f (layer-input vectors only, KL clip 1e-3)"),
                             ("eva_s", 0.01, "Eva-s (vectorized Shampoo from the gradients, SGD-norm graft)")):
    registry.register(_variant, lambda _v=_variant, _l=_lr, **kw: eva(
        **{"learning_rate": _l, "variant": _v, "weight_layout": "in_out", **kw}), _what)
