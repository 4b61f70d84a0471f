"""The GPU check's measurements: first-order, SONew and Shampoo steps on one device, and every
optimizer on the parameter trees of real models (:mod:`.trees`).

Every function takes the device layer and a :class:`Plan` and returns a list of row
dicts (``section``, ``n``, ``what``, ``ms``, ratios); a contender that cannot run says why
in ``note`` instead of raising.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import arrayopt as ao

from .timing import interleaved_ms

ADAM_BYTES = 28  # read p, g, m, v; write p, m, v (float32)
COPY_BYTES = 8   # read one, write one


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to measure: parameter counts per section, rounds and steps per sample."""

    first_order_sizes: tuple
    sonew_sizes: tuple
    shampoo_shapes: tuple
    rounds: int
    steps: int
    shampoo_steps: int
    trees: tuple = ("resnet18", "gpt2")

    @staticmethod
    def full() -> "Plan":
        return Plan((1_000_000, 10_000_000, 100_000_000), (1_000_000, 10_000_000, 100_000_000),
                    ((1024, 1024), (2048, 2048)), rounds=7, steps=20, shampoo_steps=10)

    @staticmethod
    def quick() -> "Plan":
        return Plan((1_000_000, 10_000_000), (10_000_000,), ((1024, 1024),),
                    rounds=5, steps=10, shampoo_steps=10, trees=("resnet18",))

    @staticmethod
    def tiny() -> "Plan":
        """For the command's own tests on a host stand-in."""
        return Plan((4096,), (4096,), ((8, 12),), rounds=2, steps=2, shampoo_steps=10, trees=("tiny",))


def _fits(layer, n: int, bytes_per_param: int) -> bool:
    return n * bytes_per_param < 0.7 * layer.free_bytes()


def _stepper(opt, params, grads):
    """A zero-argument function doing one in-place ``opt.step`` (the state lives in a cell)."""
    cell = [opt.init(params)]

    def step():
        _, cell[0] = opt.step(params, grads, cell[0])

    return step


def first_order(layer, plan: Plan) -> list:
    """Copy floor, our Adam (CuPy and torch tensors) and torch's fused Adam."""
    rows = []
    for n in plan.first_order_sizes:
        if not _fits(layer, n, 4 * 14):
            rows.append({"section": "adam", "n": n, "what": "skipped",
                         "note": "not enough free device memory"})
            continue
        src, dst = layer.randn(n, 1), layer.randn(n, 2)
        p, g = layer.randn(n, 3), layer.randn(n, 4) * 1e-3
        contenders = {"copy": lambda: layer.xp.copyto(dst, src),
                      f"ao.adam ({layer.array_name})": _stepper(ao.adam(1e-6), p, g)}
        if layer.torch is not None:
            torch = layer.torch
            tp = torch.nn.Parameter(layer.to_torch(layer.randn(n, 5)))
            tg = layer.to_torch(layer.randn(n, 6) * 1e-3)
            tp.grad = tg
            contenders["ao.adam (torch tensors)"] = _stepper(ao.adam(1e-6), tp, tg)
            fused = torch.optim.Adam([tp], lr=1e-6, fused=True)
            contenders["torch.optim.Adam(fused=True)"] = fused.step
        ms = interleaved_ms(contenders, layer.sync, rounds=plan.rounds, steps=plan.steps)
        bandwidth = COPY_BYTES * n / (ms["copy"] * 1e-3)
        floor = ADAM_BYTES * n / bandwidth * 1e3
        torch_ms = ms.get("torch.optim.Adam(fused=True)")
        for what, t in ms.items():
            row = {"section": "adam", "n": n, "what": what, "ms": t}
            if what == "copy":
                row["GB_per_s"] = bandwidth / 1e9
            else:
                row["x_floor"] = t / floor
                if torch_ms is not None:
                    row["x_torch_fused"] = t / torch_ms
            rows.append(row)
        del src, dst, p, g, contenders
        layer.free_pools()
    return rows


SONEW_CONTENDERS = (("SONew diagonal", 0), ("SONew tridiagonal", 1), ("SONew band-4", 4))
SONEW_BLOCK = 16384  # block-local SONew (block_size): one thread block per SONew block


def sonew(layer, plan: Plan) -> list:
    """SONew steps (Adam graft) against our Adam step on the same parameters."""
    rows = []
    for n in plan.sonew_sizes:
        # p, g, Adam's m, v, and per SONew: m, band (b+1), scratch (b + 2)
        # plus, block-local, per band: m, band (b+1) again (scratch as above)
        if not _fits(layer, n, 4 * (4 + 2 + 5 + 6 + 2 * 4 + 2 + 3 + 11)):
            rows.append({"section": "sonew", "n": n, "what": "skipped",
                         "note": "not enough free device memory"})
            continue
        p, g = layer.randn(n, 7), layer.randn(n, 8) * 1e-3
        contenders = {"our Adam": _stepper(ao.adam(1e-6), p, g)}
        for name, band in SONEW_CONTENDERS:
            contenders[name] = _stepper(ao.sonew(1e-6, band=band, block_size=None), p, g)
            contenders[f"{name}, block-local {SONEW_BLOCK}"] = _stepper(
                ao.sonew(1e-6, band=band, block_size=SONEW_BLOCK), p, g)
        ms = interleaved_ms(contenders, layer.sync, rounds=max(3, plan.rounds - 2),
                            steps=max(2, plan.steps // 2))
        adam = ms["our Adam"]
        rows += [{"section": "sonew", "n": n, "what": what, "ms": t, "x_our_adam": t / adam}
                 for what, t in ms.items()]
        del p, g, contenders
        layer.free_pools()
    return rows


def shampoo(layer, plan: Plan) -> list:
    """Shampoo steps with host roots every 1 and 10 steps; one factor's root on device vs host."""
    rows = []
    for shape in plan.shampoo_shapes:
        n = int(np.prod(shape))
        p, g = layer.randn(shape, 9), layer.randn(shape, 10) * 1e-3
        contenders = {"our Adam": _stepper(ao.adam(1e-6), p, g)}
        for every in (1, 10):
            contenders[f"Shampoo, host roots every {every}"] = _stepper(
                ao.shampoo(1e-6, block_size=1024, precondition_every=every), p, g)
        # a sample spans `shampoo_steps` steps, so roots every 10 are amortised over 10
        ms = interleaved_ms(contenders, layer.sync, rounds=3, steps=plan.shampoo_steps)
        adam = ms["our Adam"]
        label = "x".join(str(d) for d in shape)
        rows += [{"section": "shampoo", "n": n, "shape": label, "what": what, "ms": t,
                  "x_our_adam": t / adam} for what, t in ms.items()]
        del p, g, contenders
        layer.free_pools()
    rows += _roots(layer, plan)
    return rows


def _roots(layer, plan: Plan) -> list:
    """``(A + εI)^{-1/4}`` of one ``d×d`` factor: device coupled Newton vs host eigh."""
    d = min(1024, plan.shampoo_shapes[0][0])
    g = layer.randn((d, 4 * d), 11)
    A = g @ g.T / (4 * d)
    cases = {
        "root on device (Newton, float32)": lambda: ao.linalg.inverse_pth_root(
            A, 4, method="newton", compute_dtype="float32"),
        "root on device (Newton, float64)": lambda: ao.linalg.inverse_pth_root(
            A, 4, method="newton", compute_dtype="float64"),
        "root on host (eigh, float64)": lambda: ao.linalg.inverse_pth_root(A, 4, method="eigh"),
    }
    ms = interleaved_ms(cases, layer.sync, rounds=3, steps=2)
    host = ms["root on host (eigh, float64)"]
    ref = layer.to_host(cases["root on host (eigh, float64)"]()).astype(np.float64)
    rows = []
    for what, t in ms.items():
        err = np.abs(layer.to_host(cases[what]()).astype(np.float64) - ref).max() / np.abs(ref).max()
        rows.append({"section": "root", "n": d * d, "shape": f"{d}x{d}", "what": what, "ms": t,
                     "x_host_eigh": t / host, "max_rel_diff_vs_eigh": float(err)})
    return rows


#: the optimizers timed on real trees; every sample is 10 steps, a whole root cycle for F=10
TREE_CONTENDERS = (
    ("ao.adam", lambda: ao.adam(1e-3)),
    ("ao.sonew (tridiagonal, block-local)", lambda: ao.sonew(1e-3)),
    ("ao.shampoo F=10", lambda: ao.shampoo(1e-3, precondition_every=10)),
    ("ao.shampoo F=10 eigenvalue-corrected + QR",
     lambda: ao.shampoo(1e-3, precondition_every=10, preconditioner="eigenvalue_corrected", root_method="qr")),
    ("ao.sketchy", lambda: ao.sketchy(1e-3)),
    ("ao.eva eva_s", lambda: ao.eva(1e-3, variant="eva_s")),
)
TREE_STEPS = 10


def real_trees(layer, plan: Plan) -> list:
    """Each optimizer's step on the ResNet-18 and GPT-2 small trees (torch tensors on the device
    when torch is there, else the device's arrays), against torch's fused Adam on the same tree."""
    from .trees import SHAPES, tiny_leaves_shapes

    rows = []
    for tree in plan.trees:
        shapes = tiny_leaves_shapes(4, 64) | {"w": (16, 8)} if tree == "tiny" else SHAPES[tree]()
        n = sum(int(np.prod(s)) for s in shapes.values())
        if not _fits(layer, n, 4 * 24):
            rows.append({"section": "trees", "tree": tree, "n": n, "what": "skipped",
                         "note": "not enough free device memory"})
            continue
        wrap = layer.to_torch if layer.torch is not None else (lambda a: a)
        params = {k: wrap(layer.randn(s, 10 + i)) for i, (k, s) in enumerate(shapes.items())}
        grads = {k: wrap(layer.randn(s, 1000 + i) * 1e-3) for i, (k, s) in enumerate(shapes.items())}
        contenders = {}
        if layer.torch is not None:
            tp = [layer.torch.nn.Parameter(p.clone()) for p in params.values()]
            for p, g in zip(tp, grads.values()):
                p.grad = g
            contenders["torch.optim.Adam(fused=True)"] = layer.torch.optim.Adam(tp, lr=1e-3, fused=True).step
        for name, make in TREE_CONTENDERS:
            try:
                step = _stepper(make(), {k: v.clone() if hasattr(v, "clone") else v.copy()
                                         for k, v in params.items()}, grads)
                step()  # compile / first roots outside the timing; a failure is reported, not raised
            except Exception as e:  # noqa: BLE001 - one optimizer failing must not cost the others
                rows.append({"section": "trees", "tree": tree, "n": n, "what": name,
                             "note": f"failed: {type(e).__name__}: {e}"})
                continue
            contenders[name] = step
        ms = interleaved_ms(contenders, layer.sync, rounds=max(2, plan.rounds - 2), steps=TREE_STEPS)
        torch_ms = ms.get("torch.optim.Adam(fused=True)")
        for name, t in ms.items():
            row = {"section": "trees", "tree": tree, "n": n, "what": name, "ms": t}
            if torch_ms:
                row["x_torch_fused"] = t / torch_ms
            rows.append(row)
        del params, grads, contenders
        layer.free_pools()
    return rows
