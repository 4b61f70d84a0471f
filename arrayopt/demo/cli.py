"""Command line: ``python -m arrayopt.demo`` / ``arrayopt-demo``.

Trains the MLP autoencoder (:mod:`arrayopt.demo.model`) with every registered
optimizer (or ``--optimizers``), from the same initial params and with the same
minibatch order, once per seed (``--seeds``), then prints the results table (mean
± standard deviation over the seeds) and writes ``results.json``, ``results.md``
and ``losses.png`` (first seed) to ``--out``. Two tasks:

- ``digits`` (default): 64-256-128-64-16-64-128-256-64 on scikit-learn's digits
  (:mod:`arrayopt.demo.data`), 3 seeds; the seed also picks the train/test split;
- ``mnist-autoencoder``: the SONew paper's benchmark, 784-1000-500-250-30-250-500-
  1000-784 on MNIST's 60 000 training images (:mod:`arrayopt.demo.mnist`), batch
  1000, the paper's learning-rate schedule (:mod:`arrayopt.demo.schedule`) on top
  of each optimizer's learning rate, full-train loss after every epoch.

SONew rows are block-local (``block_size`` 16384, or ``--block-size``); an
optimizer name ``NAME:whole`` is the registered SONew ``NAME`` with
``block_size=None`` (whole-tensor ε and graft norms, the paper's form).
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

from ..sonew import DEFAULT_BLOCK_SIZE, SONew
from . import data, mnist, model, report, schedule, threads, train

__all__ = ["main", "parse_args", "run_one"]

TASKS = ("digits", "mnist-autoencoder")
# per task: epochs, batch size, seeds
DEFAULTS = {"digits": (10, 32, 3), "mnist-autoencoder": (schedule.PAPER_EPOCHS, 1000, 1)}
MNIST_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
MNIST_OPTIMIZERS = ("adam", "sonew_diag", "sonew_tridiag", "sonew_tridiag:whole", "sonew_band4",
                    "sonew_band4:whole", "shampoo", "shampoo_ec")
# the paper's Shampoo set-up on this task: roots every 20 steps, preconditioning from step 25
MNIST_OVERRIDES = {name: {"precondition_every": 20, "start_preconditioning_step": 25}
                   for name in ("shampoo", "shampoo_ec")}
WHOLE_SUFFIX = ":whole"
BACKENDS = ("auto", "reference", "numba_cpu")
DTYPES = ("float32", "float64", "bfloat16")


def _dtypes(name: str):
    """``(data dtype, params dtype)``: bfloat16 params (stored and stepped in bfloat16, the model
    computing in float32, :mod:`arrayopt.demo.model`) see float32 images."""
    if name != "bfloat16":
        return np.dtype(name), np.dtype(name)
    try:
        import ml_dtypes
    except ImportError:
        raise SystemExit("arrayopt-demo: error: --dtype bfloat16 needs ml_dtypes (pip install ml_dtypes)") from None
    return np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)


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
        description="Train an MLP autoencoder (tanh, linear code layer, sigmoid cross-entropy) with every "
                    "registered arrayopt optimizer and compare losses, speed and optimizer-state memory: "
                    "64-256-128-64-16-64-128-256-64 on scikit-learn's digits (--task digits), or the SONew "
                    "paper's 784-1000-500-250-30-250-500-1000-784 on MNIST (--task mnist-autoencoder).")
    names = ", ".join(ao.registry.registered())
    p.add_argument("--task", choices=TASKS, default="digits", help="the benchmark (default digits)")
    p.add_argument("--data", default=None,
                   help=f"MNIST: an .npz (array 'train', optionally 'test') or a folder of IDX files "
                        f"(default: ${mnist.ENV_VAR}, the cache, openml.org, the {mnist.WHEEL} wheel)")
    p.add_argument("--optimizers", default=None,
                   help=f"comma-separated registered optimizers, NAME{WHOLE_SUFFIX} for whole-tensor SONew "
                        f"(default: digits: all: {names}; mnist-autoencoder: {','.join(MNIST_OPTIMIZERS)})")
    p.add_argument("--block-size", type=_positive_int, default=None,
                   help=f"block_size of the block-local SONew rows (default: SONew's, "
                        f"{DEFAULT_BLOCK_SIZE})")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="passes over the training set (default: digits 10, mnist-autoencoder 100)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="minibatch size (default: digits 32, mnist-autoencoder 1000)")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed: of the initial params, the batch order and (digits) the train/test "
                        "split (default 0)")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help="runs per optimizer, seeds --seed, --seed+1, ... (default: digits 3, mnist-autoencoder 1)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="arrayopt kernel backend (default auto)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of data, params and computation (default float32); bfloat16: params "
                        "stored and stepped in bfloat16, the model computing in float32 (needs ml_dtypes)")
    p.add_argument("--lr", type=_lr_overrides, default={}, metavar="NAME=LR[,NAME=LR]",
                   help="override registered learning rates, e.g. --lr sgd=0.01,adam=1e-3")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="CPU threads for BLAS and the Numba kernels during training (default 1: the "
                        "model is small and idle threads spinning between calls slow every step)")
    p.add_argument("--out", default="arrayopt-demo-out",
                   help="output folder (default arrayopt-demo-out)")
    p.add_argument("--jobs", type=_positive_int, default=None,
                   help="processes running (seed, optimizer) pairs side by side (default: digits one per "
                        "CPU core, mnist-autoencoder 1); the rates of parallel runs share the machine")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    epochs, batch_size, seeds = DEFAULTS[args.task]
    args.epochs = args.epochs or epochs
    args.batch_size = args.batch_size or batch_size
    args.seeds = args.seeds or seeds
    available = ao.registry.registered()
    if args.optimizers is None:
        args.optimizers = list(available) if args.task == "digits" else list(MNIST_OPTIMIZERS)
    else:
        args.optimizers = [s.strip() for s in args.optimizers.split(",") if s.strip()]
        if not args.optimizers:
            p.error("--optimizers: no optimizer named")
    unknown = [n for n in args.optimizers + list(args.lr) if _base_name(n) not in available]
    if unknown:
        p.error(f"unknown optimizer(s) {', '.join(map(repr, unknown))}; registered: {', '.join(available)}")
    not_sonew = [n for n in args.optimizers if n != _base_name(n) and not _is_sonew(n)]
    if not_sonew:
        p.error(f"{WHOLE_SUFFIX} is for SONew rows only, got {', '.join(map(repr, not_sonew))}")
    return args


def _base_name(name: str) -> str:
    return name[:-len(WHOLE_SUFFIX)] if name.endswith(WHOLE_SUFFIX) else name


def _is_sonew(name: str) -> bool:
    return isinstance(ao.registry.make(_base_name(name)), SONew)


def make_optimizer(name: str, args: argparse.Namespace, total_steps: int):
    """The registered optimizer ``name`` (``NAME:whole``: SONew with ``block_size=None``) with the task's
    settings: ``--lr`` overrides; on mnist-autoencoder the paper's schedule of its learning rate."""
    base = _base_name(name)
    kw = dict(MNIST_OVERRIDES.get(base, {})) if args.task == "mnist-autoencoder" else {}
    if name != base:
        kw["block_size"] = None
    elif args.block_size is not None and _is_sonew(name):
        kw["block_size"] = args.block_size
    lr = args.lr.get(name, args.lr.get(base))
    if lr is not None:
        kw["learning_rate"] = lr
    if args.task == "mnist-autoencoder":
        if lr is None:
            lr = _learning_rate(ao.registry.make(base, **kw))
        kw["learning_rate"] = schedule.paper_schedule(float(lr), total_steps)
    return ao.registry.make(base, **kw)


def _learning_rate(opt) -> float:
    """The (float) learning rate a registered optimizer was made with."""
    holder = getattr(opt, "config", opt)  # Shampoo keeps its settings in a frozen config
    return float(holder.learning_rate)


def _describe(name: str, args: argparse.Namespace) -> str:
    text = ao.registry.registered()[_base_name(name)].description
    overrides = MNIST_OVERRIDES.get(_base_name(name), {}) if args.task == "mnist-autoencoder" else {}
    if overrides:
        text += "; on this task " + ", ".join(f"{k} {v}" for k, v in overrides.items())
    if name != _base_name(name):
        return text + ", whole-tensor (block_size None)"
    if _is_sonew(name):
        return text + f", block-local, block_size {args.block_size or DEFAULT_BLOCK_SIZE}"
    return text


def _load_task(args: argparse.Namespace, seed: int, dtype):
    """``(images, sizes)``: digits are split by ``seed``; MNIST is loaded once (cached)."""
    if args.task == "digits":
        digits = data.load(seed=seed, dtype=dtype)
        return digits, (digits.n_features,) + model.SIZES[1:-1] + (digits.n_features,)
    if getattr(args, "_mnist", None) is None:
        m = mnist.load(args.data)
        test = m.test if m.test.shape[0] else m.train  # no test images given: "test" is the train set
        args._mnist = data.Digits(train=m.train.astype(dtype, copy=False), test=test.astype(dtype, copy=False))
    return args._mnist, MNIST_SIZES


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


def _auto_jobs(args: argparse.Namespace) -> int:
    """Digits: one process per core (each run is small and single-threaded); MNIST: one."""
    if args.task != "digits":
        return 1
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, len(cores))


def _run_unit(args: argparse.Namespace, seed: int, name: str, steps_per_epoch: int,
              progress: _Progress) -> train.RunResult:
    """One optimizer, one seed: the seed's data split and initial params, then :func:`run_one`."""
    dtype, param_dtype = _dtypes(args.dtype)
    digits, sizes = _load_task(args, seed, dtype)
    params0 = model.init_params(np.random.default_rng(seed), sizes, dtype=param_dtype)
    description = _describe(name, args)
    try:
        opt = make_optimizer(name, args, args.epochs * steps_per_epoch)
        r = run_one(name, opt, params0, digits, epochs=args.epochs, batch_size=args.batch_size,
                    seed=seed, description=description, progress=progress)
    except Exception as e:  # one broken optimizer must not hide the others' results
        traceback.print_exc()
        r = train.RunResult(name=name, description=description, failed=True, error=f"{type(e).__name__}: {e}")
    r.seed = seed
    return r


def _unit_in_worker(args: argparse.Namespace, seed: int, name: str, steps_per_epoch: int) -> train.RunResult:
    backend = None if args.backend == "auto" else args.backend
    with ao.dispatch.use_backend(backend), threads.limit(args.threads):
        r = _run_unit(args, seed, name, steps_per_epoch, _Progress(False))
    print(f"  done: {name}, seed {seed}: train loss {r.final_train_loss:.3f}"
          f"{' (failed)' if r.failed else ''}", flush=True)
    return r


def _run_parallel(args: argparse.Namespace, units: list, jobs: int, steps_per_epoch: int) -> list:
    """The runs in ``jobs`` fresh processes (spawned: no forked BLAS or Numba threads), results in
    ``units`` order. Each process loads its data itself; the Numba cache is shared on disk."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    light = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_")})
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_unit_in_worker, light, seed, name, steps_per_epoch) for seed, name in units]
        return [f.result() for f in futures]


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    dtype, param_dtype = _dtypes(args.dtype)
    backend = None if args.backend == "auto" else args.backend
    seeds = [args.seed + i for i in range(args.seeds)]

    digits, sizes = _load_task(args, seeds[0], dtype)
    if args.batch_size > digits.train.shape[0]:
        print(f"arrayopt-demo: error: --batch-size {args.batch_size} exceeds the "
              f"{digits.train.shape[0]} training images", file=sys.stderr)
        return 2
    n_params = model.num_params(model.init_params(np.random.default_rng(0), sizes, dtype=param_dtype))
    steps_per_epoch = digits.train.shape[0] // args.batch_size
    floor_train = float(model.target_entropy(digits.train).mean())
    floor_test = float(model.target_entropy(digits.test).mean())
    data_name = "digits" if args.task == "digits" else "MNIST"
    lr_note = "; lr: the paper's schedule (warm-up, linear decay)" if args.task != "digits" else ""
    print(f"MLP autoencoder {'-'.join(map(str, sizes))} ({n_params:,} params, {args.dtype}); "
          f"{data_name}: {digits.train.shape[0]} train / {digits.test.shape[0]} test images; "
          f"{args.epochs} epochs x {steps_per_epoch} steps of batch {args.batch_size}{lr_note}; "
          f"seeds {seeds[0]}..{seeds[-1]}; backend {args.backend}; loss floor (target entropy): "
          f"{floor_train:.2f} train / {floor_test:.2f} test", flush=True)

    units = [(seed, name) for seed in seeds for name in args.optimizers]
    jobs = min(args.jobs or _auto_jobs(args), len(units))
    if jobs > 1:
        print(f"{len(units)} runs in {jobs} processes (--jobs); no progress bars", flush=True)
        results = _run_parallel(args, units, jobs, steps_per_epoch)
    else:
        progress = _Progress(not args.no_progress)
        with ao.dispatch.use_backend(backend), threads.limit(args.threads):
            results = [_run_unit(args, seed, name, steps_per_epoch, progress) for seed, name in units]

    os.makedirs(args.out, exist_ok=True)
    report.plot(os.path.join(args.out, "losses.png"), [r for r in results if r.seed == seeds[0]],
                title=f"MLP autoencoder {'-'.join(map(str, sizes))} on {data_name} "
                      f"({args.dtype}, backend {args.backend}, seed {seeds[0]})")
    wall = time.perf_counter() - t_start  # everything but the interpreter's start and the JSON/Markdown
    config = {
        "task": args.task,
        "model": "-".join(map(str, sizes)),
        "params": n_params,
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
        "seeds": seeds,
        "dtype": args.dtype,
        "backend": args.backend,
        "threads": args.threads,
        "jobs": jobs,
        "lr_overrides": args.lr,
        "lr_schedule": "paper (per-epoch warm-up and linear decay)" if args.task != "digits" else "constant",
        "block_size": args.block_size or DEFAULT_BLOCK_SIZE,
        "optimizers": args.optimizers,
        "wall_seconds": round(wall, 2),
        "arrayopt": ao.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    report.write_json(os.path.join(args.out, "results.json"), config, results)
    report.write_markdown(os.path.join(args.out, "results.md"), config, results,
                          title=f"MLP autoencoder on {data_name}")
    print()
    print(report.format_table(results))
    print(f"({report.LOSS_NOTE}: {floor_train:.2f} train / {floor_test:.2f} test; the plot uses the same.)")
    if len(seeds) > 1:
        print(f"(losses: mean ± standard deviation over the {len(seeds)} seeds {seeds[0]}..{seeds[-1]}; "
              "steps/s: mean)")
    warm = ", ".join(f"{r.name} {r.warmup_seconds:.1f} s" for r in results if not r.failed and r.seed == seeds[0])
    print(f"warm-up step (kernel compilation on a cold cache), not in the rates: {warm}")
    for r in results:
        if r.diverged or r.failed:
            print(f"{r.name} (seed {r.seed}): {'diverged' if r.diverged else 'failed'} ({r.error})")
    print(f"\nwall time {wall:.1f} s; wrote results.json, results.md, losses.png to {args.out}")
    return 1 if any(r.failed for r in results) else 0
