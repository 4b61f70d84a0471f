"""The autoencoder with bfloat16 parameters (torch CPU tensors), against float32.

``python -m arrayopt.demo.bf16 [--optimizers adam,sonew_tridiag] [--epochs 20]``

The parameters live in bfloat16 torch tensors; the optimizer keeps float32 state
and computes in float32 (the library's dtype policy) and rounds the new
parameters to bfloat16 after every step. The forward and backward pass is the
NumPy model of the main job, run in float32 on the bfloat16 values, and the
gradients are rounded to bfloat16 before the step, so both the optimizer's
input and its output are bfloat16. The same seed, initial values (rounded to
bfloat16 for both runs) and batches are used for the float32 run beside it.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

import arrayopt as ao

from . import data, model
from .threads import limit
from .train import batches


def _run(name: str, bf16: bool, params0: dict, digits, epochs: int, batch_size: int, seed: int):
    import torch

    opt = ao.registry.make(name)
    if bf16:
        params = {k: torch.tensor(v).to(torch.bfloat16) for k, v in params0.items()}
        as_np = lambda p: {k: v.float().numpy() for k, v in p.items()}  # noqa: E731
        to_grads = lambda g: {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in g.items()}  # noqa: E731
    else:
        params = {k: v.copy() for k, v in params0.items()}
        as_np = lambda p: p  # noqa: E731
        to_grads = lambda g: g  # noqa: E731
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    nonfinite_updates = 0
    for _ in range(epochs):
        for idx in batches(digits.train.shape[0], batch_size, rng):
            _, g = model.loss_and_grads(as_np(params), digits.train[idx])
            params, state = opt.step(params, to_grads(g), state)
            if bf16 and not all(bool(torch.isfinite(v).all()) for v in params.values()):
                nonfinite_updates += 1
    p = as_np(params)
    return model.loss(p, digits.train), model.loss(p, digits.test), nonfinite_updates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m arrayopt.demo.bf16", description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default="adam,sonew_diag,sonew_tridiag,sonew_band4")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import ml_dtypes  # bfloat16 rounding of the initial values in NumPy (installed with jax)
        import torch
    except ImportError as e:
        print(f"bfloat16 parameters need torch and ml_dtypes (pip install '.[test]'): {e}")
        return 1

    torch.set_num_threads(1)  # small model: one thread per pool, as in the main job

    digits = data.load(seed=args.seed)
    p0 = model.init_params(np.random.default_rng(args.seed))
    p0 = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in p0.items()}
    print(f"autoencoder {'-'.join(map(str, model.SIZES))}, {args.epochs} epochs, batch {args.batch_size}; "
          f"train/test loss (nats per image, floor {float(model.target_entropy(digits.train).mean()):.2f})")
    print(f"{'optimizer':<15}{'float32 train':>14}{'bf16 train':>12}{'float32 test':>14}{'bf16 test':>11}"
          f"{'bf16 non-finite':>17}")
    for name in args.optimizers.split(","):
        with limit(1):
            f_tr, f_te, _ = _run(name, False, p0, digits, args.epochs, args.batch_size, args.seed)
            b_tr, b_te, bad = _run(name, True, p0, digits, args.epochs, args.batch_size, args.seed)
        ok = all(math.isfinite(x) for x in (b_tr, b_te))
        print(f"{name:<15}{f_tr:>14.3f}{b_tr:>12.3f}{f_te:>14.3f}{b_te:>11.3f}{bad if ok else 'diverged':>17}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
