"""asv: one optimizer step on the parameter trees of real models (ResNet-18, GPT-2 small).

The trees are plain dicts of torch CPU float32 tensors named and shaped like
``dict(model.named_parameters())`` of torchvision's ResNet-18 (62 leaves, 11.7M params) and
Hugging Face's GPT-2 small (148 leaves, 124M params), built without either library. Every
contender steps the same params in place (shared storage; the learning rate is tiny) from a
rotating pair of fixed gradient trees:

- torch Adam ``fused=True`` / ``foreach=True`` (the denominators);
- peers, when installed (the ``bench`` extra): ``pytorch_optimizer`` Shampoo (F=1),
  ScalableShampoo (block 1024, F=10), SOAP; heavyball SOAP (eager);
- arrayopt through ``opt.step(params, grads, state)`` on the torch tensors: adam, sonew
  diag/tri/band-4, shampoo F=1 and F=10 (root-inverse by eigh, and eigenvalue-corrected with
  QR-refreshed bases), sketchy, eva_s.

A contender with ``every = F > 1`` is timed over whole cycles of F steps (the amortized step).
Ratios to torch fused Adam measured in one process, contenders interleaved:
``asv_bench/scripts/real_trees.py``.
"""

from __future__ import annotations

from .common import ao

from arrayopt.gpu_check.trees import SHAPES, gpt2_shapes, resnet18_shapes, tiny_leaves_shapes  # noqa: E402,F401

LR = 1e-6
TREES = ("resnet18", "gpt2")


# ---------------------------------------------------------------- trees (shapes only)




def make_tree(shapes: dict, seed: int, scale: float = 1.0) -> dict:
    """A dict of float32 CPU tensors ~ N(0, scale²), every page written."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float32) * scale for k, s in shapes.items()}


class TreeData:
    """The params of a tree and two gradient trees (shared by every contender)."""

    def __init__(self, shapes: dict):
        self.shapes = shapes
        self.params = make_tree(shapes, 0)
        self.grads = [make_tree(shapes, 1 + i, 1e-2) for i in range(2)]
        self.n_leaves = len(shapes)
        self.n_params = sum(int(t.numel()) for t in self.params.values())


# ---------------------------------------------------------------- contenders


class Ours:
    """arrayopt ``opt.step`` on the tree's torch tensors (in place)."""

    def __init__(self, opt, data: TreeData, every: int = 1):
        self.opt, self.data, self.every = opt, data, every
        self.state = opt.init(data.params)
        self.i = 0

    def __call__(self):
        d = self.data
        for _ in range(self.every):
            _, self.state = self.opt.step(d.params, d.grads[self.i % 2], self.state)
            self.i += 1


class TorchOpt:
    """A ``torch.optim.Optimizer`` on Parameters sharing the tree's storage."""

    def __init__(self, make, data: TreeData, every: int = 1):
        import torch

        self.params = [torch.nn.Parameter(t) for t in data.params.values()]
        self.grads = [list(g.values()) for g in data.grads]
        self.opt, self.every, self.i = make(self.params), every, 0

    def __call__(self):
        for _ in range(self.every):
            for p, g in zip(self.params, self.grads[self.i % 2]):
                p.grad = g
            self.opt.step()
            self.i += 1


def _torch_adam(**kw):
    import torch

    return lambda ps: torch.optim.Adam(ps, lr=LR, **kw)


def _po(name, **kw):
    import pytorch_optimizer as po

    cls = getattr(po, name)
    return lambda ps: cls(ps, lr=LR, **kw)


def _hb_soap(**kw):
    import heavyball
    import heavyball.utils as hbu

    hbu.compile_mode = None  # eager: no torch.compile on this machine
    return lambda ps: heavyball.SOAP(ps, lr=LR, **kw)


def _shampoo(freq, **kw):
    return ao.shampoo(learning_rate=LR, block_size=1024, precondition_every=freq, **kw)


# name -> (kind, builder(data) -> callable, steps per timed call). kind: "torch" | "peer" | "ours"
CONTENDERS = {
    "torch Adam fused": ("torch", lambda d: TorchOpt(_torch_adam(fused=True), d), 1),
    "torch Adam foreach": ("torch", lambda d: TorchOpt(_torch_adam(foreach=True), d), 1),
    "po Shampoo F=1": ("peer", lambda d: TorchOpt(_po("Shampoo", preconditioning_compute_steps=1,
                                                      matrix_eps=1e-6), d), 1),
    "po ScalableShampoo F=10": ("peer", lambda d: TorchOpt(_po(
        "ScalableShampoo", block_size=1024, preconditioning_compute_steps=10, start_preconditioning_step=1), d,
        10), 10),
    "po SOAP F=10": ("peer", lambda d: TorchOpt(_po("SOAP", precondition_frequency=10), d, 10), 10),
    "hb SOAP eager F=10": ("peer", lambda d: TorchOpt(_hb_soap(precondition_frequency=10), d, 10), 10),
    "ao adam": ("ours", lambda d: Ours(ao.adam(learning_rate=LR), d), 1),
    "ao sonew diag": ("ours", lambda d: Ours(ao.sonew(learning_rate=LR, band=0), d), 1),
    "ao sonew tri": ("ours", lambda d: Ours(ao.sonew(learning_rate=LR, band=1), d), 1),
    "ao sonew band-4": ("ours", lambda d: Ours(ao.sonew(learning_rate=LR, band=4), d), 1),
    # F=1: pytorch_optimizer.Shampoo's settings (running sum, no momentum, no grafting)
    "ao shampoo F=1": ("ours", lambda d: Ours(_shampoo(1, b1=0.0, b2=1.0, eps=1e-6, graft="none"), d), 1),
    # and its precision and factors: float32 roots (po: float32 SVD), one factor per dim (po merges none)
    "ao shampoo F=1 f32 per-dim": ("ours", lambda d: Ours(_shampoo(
        1, b1=0.0, b2=1.0, eps=1e-6, graft="none", root_dtype="float32", merge_small_dims=1), d), 1),
    "ao shampoo F=10": ("ours", lambda d: Ours(_shampoo(10), d, 10), 10),
    "ao shampoo EC-QR F=10": ("ours", lambda d: Ours(_shampoo(
        10, b2=0.95, preconditioner="eigenvalue_corrected", root_method="qr", root_dtype="float32"), d, 10), 10),
    "ao sketchy": ("ours", lambda d: Ours(ao.sketchy(learning_rate=LR, rank=128), d), 1),
    "ao eva_s": ("ours", lambda d: Ours(ao.eva(LR, variant="eva_s"), d), 1),
}

REFERENCE = "torch Adam fused"

#: our contender -> the peer its target names (the script prints their ratio per round)
PEER = {"ao shampoo F=1": "po Shampoo F=1", "ao shampoo F=1 f32 per-dim": "po Shampoo F=1",
        "ao shampoo F=10": "po ScalableShampoo F=10", "ao shampoo EC-QR F=10": "po SOAP F=10",
        "ao sketchy": "po Shampoo F=1"}

#: contenders of the per-leaf fixed-cost fit
FIT_CONTENDERS = ("torch Adam fused", "ao adam", "ao sonew tri", "ao shampoo F=1", "ao shampoo F=10",
                  "ao sketchy", "ao eva_s")


#: ``"<ours> (reference)"``: that contender of ours with the reference forced (``use_backend``), to time
#: a kernel against the pure array-API step in the same rounds
REF_SUFFIX = " (reference)"


class _ReferenceForced:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        with ao.dispatch.use_backend("reference"):
            self.fn()


def spec(name: str):
    """``(kind, builder, steps per call)`` of a contender, its ``(reference)`` twin included (``KeyError``
    for an unknown name)."""
    base = name[:-len(REF_SUFFIX)] if name.endswith(REF_SUFFIX) else None
    if base is not None and CONTENDERS.get(base, ("",))[0] == "ours":
        kind, make, every = CONTENDERS[base]
        return kind, (lambda d: _ReferenceForced(make(d))), every
    return CONTENDERS[name]


def peer_of(name: str):
    """The peer a contender (or its ``(reference)`` twin) is compared with, or ``None``."""
    return PEER.get(name[:-len(REF_SUFFIX)] if name.endswith(REF_SUFFIX) else name)


def build(name: str, data: TreeData, warmup: int = 1):
    """The contender's callable, warmed up (``None`` when its peer library is not installed)."""
    kind, make, _ = spec(name)
    try:
        fn = make(data)
    except ImportError:
        if kind != "peer":
            raise
        return None
    for _ in range(warmup):
        fn()
    return fn


# ---------------------------------------------------------------- asv


class RealTreeStep:
    """Seconds per timed call (one step; a whole cycle of F steps for the F=10 contenders)."""

    params = (list(TREES), ["torch Adam fused", "ao adam", "ao sonew tri", "ao shampoo F=10",
                            "ao shampoo EC-QR F=10", "ao sketchy", "ao eva_s"])
    param_names = ["tree", "contender"]
    timeout = 900
    number = 1
    repeat = 3

    def setup(self, tree, name):
        self.fn = build(name, TreeData(SHAPES[tree]()))
        if self.fn is None:
            raise NotImplementedError(f"{name}: its library is not installed")

    def time_step(self, tree, name):
        self.fn()
