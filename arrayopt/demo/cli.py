"""Command line: ``python -m arrayopt.demo`` / ``arrayopt-demo``.

Trains the MLP autoencoder (:mod:`arrayopt.demo.model`) on scikit-learn's digits
(:mod:`arrayopt.demo.data`) with every registered optimizer (or ``--optimizers``),
from the same initial params and with the same minibatch order, then prints the
results table and writes ``results.json``, ``results.md`` and ``losses.png`` to
``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback

import numpy as np

import arrayopt as ao

from . import data, model, report, threads, train

__all__ = ["main", "parse_args", "run_one"]

DEFAULT_EPOCHS = 20
DEFAULT_BATCH_SIZE = 32
BACKENDS = ("auto", "reference", "numba_cpu")
DTYPES = {"float32": np.float32, "float64": np.float64}


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def _lr_overrides(text: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected NAME=LR pairs, got {item!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"learning rate of {name!r}: not a number: {value!r}") from None
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="arrayopt-demo",
        description="Train an MLP autoencoder (64-256-128-64-16-64-128-256-64, tanh, sigmoid "
                    "cross-entropy) on scikit-learn's digits with every registered arrayopt optimizer "
                    "and compare losses, speed and optimizer-state memory.")
    names = ", ".join(ao.registry.registered())
    p.add_argument("--optimizers", default=None,
                   help=f"comma-separated registered optimizers (default: all: {names})")
    p.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
                   help=f"passes over the training set (default {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"minibatch size (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the train/test split, the initial params and the batch order (default 0)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="arrayopt kernel backend (default auto)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="dtype of data, params and computation (default float32)")
    p.add_argument("--lr", type=_lr_overrides, default={}, metavar="NAME=LR[,NAME=LR]",
                   help="override registered learning rates, e.g. --lr sgd=0.01,adam=1e-3")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="CPU threads for BLAS and the Numba kernels during training (default 1: the "
                        "model is small and idle threads spinning between calls slow every step)")
    p.add_argument("--out", default="arrayopt-demo-out",
                   help="output folder (default arrayopt-demo-out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    available = ao.registry.registered()
    if args.optimizers is None:
        args.optimizers = list(available)
    else:
        args.optimizers = [s.strip() for s in args.optimizers.split(",") if s.strip()]
        if not args.optimizers:
            p.error("--optimizers: no optimizer named")
    unknown = [n for n in args.optimizers + list(args.lr) if n not in available]
    if unknown:
        p.error(f"unknown optimizer(s) {', '.join(map(repr, unknown))}; registered: {', '.join(available)}")
    return args


COMPILING = "compiling kernels (first run only)"


class _Progress:
    """A tqdm bar per optimizer, or nothing when tqdm is missing or disabled."""

    def __init__(self, enabled: bool, file=None):
        self.tqdm = None
        self.file = file
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.tqdm = tqdm
            except ImportError:
                pass

    def bar(self, name: str, total: int):
        if self.tqdm is None:
            return None
        return self.tqdm(total=total, desc=f"{name:>12}", unit="step", leave=True,
                         file=self.file or sys.stderr, dynamic_ncols=True)


def run_one(name: str, opt, params0: dict, digits, *, epochs: int, batch_size: int, seed: int,
            description: str, progress: _Progress) -> train.RunResult:
    """Train one optimizer with its progress bar.

    The warm-up step (kernel compilation on a cold Numba cache) runs first, under the
    label "compiling kernels (first run only)"; the bar is then reset, so its rate and
    ETA count training steps only. The warm-up time is ``RunResult.warmup_seconds``.
    """
    steps_per_epoch = digits.train.shape[0] // batch_size
    bar = progress.bar(name, epochs * steps_per_epoch)
    try:
        if bar is not None:
            bar.set_description_str(f"{name:>12}: {COMPILING}")
        warmup = train.warm_up(opt, params0, digits.train[:batch_size])
        if bar is not None:
            bar.set_description_str(f"{name:>12}")
            bar.reset()  # restarts the clock: compilation stays out of the rate

        def on_step(step, loss):
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.2f}", refresh=False)

        r = train.train(name, opt, params0, digits.train, digits.test, epochs=epochs,
                        batch_size=batch_size, seed=seed, description=description, on_step=on_step,
                        warmup=False)
        r.warmup_seconds = warmup
        return r
    finally:
        if bar is not None:
            bar.close()


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    backend = None if args.backend == "auto" else args.backend

    digits = data.load(seed=args.seed, dtype=dtype)
    if args.batch_size > digits.train.shape[0]:
        print(f"arrayopt-demo: error: --batch-size {args.batch_size} exceeds the "
              f"{digits.train.shape[0]} training images", file=sys.stderr)
        return 2
    sizes = (digits.n_features,) + model.SIZES[1:-1] + (digits.n_features,)
    params0 = model.init_params(np.random.default_rng(args.seed), sizes, dtype=dtype)
    steps_per_epoch = digits.train.shape[0] // args.batch_size
    registry = ao.registry.registered()
    floor_train = float(model.target_entropy(digits.train).mean())
    floor_test = float(model.target_entropy(digits.test).mean())
    print(f"MLP autoencoder {'-'.join(map(str, sizes))} ({model.num_params(params0):,} params, {args.dtype}); "
          f"digits: {digits.train.shape[0]} train / {digits.test.shape[0]} test images; "
          f"{args.epochs} epochs x {steps_per_epoch} steps of batch {args.batch_size}; "
          f"backend {args.backend}; loss floor (target entropy): {floor_train:.2f} train / "
          f"{floor_test:.2f} test", flush=True)

    progress = _Progress(not args.no_progress)
    results = []
    with ao.dispatch.use_backend(backend), threads.limit(args.threads):
        for name in args.optimizers:
            overrides = {"learning_rate": args.lr[name]} if name in args.lr else {}
            try:
                opt = ao.registry.make(name, **overrides)
                r = run_one(name, opt, params0, digits, epochs=args.epochs, batch_size=args.batch_size,
                            seed=args.seed, description=registry[name].description, progress=progress)
            except Exception as e:  # one broken optimizer must not hide the others' results
                traceback.print_exc()
                r = train.RunResult(name=name, description=registry[name].description, failed=True,
                                    error=f"{type(e).__name__}: {e}")
            results.append(r)

    os.makedirs(args.out, exist_ok=True)
    report.plot(os.path.join(args.out, "losses.png"), results,
                title=f"MLP autoencoder {'-'.join(map(str, sizes))} on digits "
                      f"({args.dtype}, backend {args.backend})")
    wall = time.perf_counter() - t_start  # everything but the interpreter's start and the JSON/Markdown
    config = {
        "model": "-".join(map(str, sizes)),
        "params": model.num_params(params0),
        "loss": "sigmoid cross-entropy, summed over pixels, mean over batch (nats/image)",
        "table_and_plot_loss": report.LOSS_NOTE,
        "loss_floor_train": round(floor_train, 4),
        "loss_floor_test": round(floor_test, 4),
        "train_images": int(digits.train.shape[0]),
        "test_images": int(digits.test.shape[0]),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "steps_per_epoch": steps_per_epoch,
        "seed": args.seed,
        "dtype": args.dtype,
        "backend": args.backend,
        "threads": args.threads,
        "lr_overrides": args.lr,
        "optimizers": args.optimizers,
        "wall_seconds": round(wall, 2),
        "arrayopt": ao.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    report.write_json(os.path.join(args.out, "results.json"), config, results)
    report.write_markdown(os.path.join(args.out, "results.md"), config, results)
    print()
    print(report.format_table(results))
    print(f"({report.LOSS_NOTE}: {floor_train:.2f} train / {floor_test:.2f} test; the plot uses the same.)")
    warm = ", ".join(f"{r.name} {r.warmup_seconds:.1f} s" for r in results if not r.failed)
    print(f"warm-up step (kernel compilation on a cold cache), not in the rates: {warm}")
    for r in results:
        if r.diverged or r.failed:
            print(f"{r.name}: {'diverged' if r.diverged else 'failed'} ({r.error})")
    print(f"\nwall time {wall:.1f} s; wrote results.json, results.md, losses.png to {args.out}")
    return 1 if any(r.failed for r in results) else 0
