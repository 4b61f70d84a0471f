"""Shared pieces of the asv suite: data generators, warm-up, steppers and the
in-process ratio measurements (also used by ``asv_bench/scripts/report_ratios.py``).

Conventions:

- Arrays are allocated and filled in setup (``np.random``/``np.full``), so every
  page is touched before anything is timed; each stepper runs a few untimed
  steps on construction, which compiles (or loads from Numba's cache) the
  kernels and lets the reference path allocate its temporaries once.
- Ratios are measured in ONE process with the contenders interleaved
  round-robin (the order rotates every round) and reported as ratios of
  medians, so the machine's noise hits numerator and denominator alike.
- Bandwidth floor of an Adam step: 28 B/param (read p, g, m, v; write p, m, v)
  divided by the bandwidth of an in-place Numba ``prange`` axpy ``a += s*b``
  (12 B/param: read a, b; write a) on arrays of the same size, measured in the
  same rounds. So ``floor_ms = axpy_ms * 28 / 12``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import numpy as np


def _import_arrayopt():
    """The installed arrayopt, or else the checkout this folder lives in (``asv run --python=same``)."""
    try:
        import arrayopt
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if root not in sys.path:
            sys.path.insert(0, root)
        import arrayopt
    return arrayopt


ao = _import_arrayopt()

import numba  # noqa: E402  (a hard dependency of arrayopt)
from numba import njit, prange  # noqa: E402

__all__ = [
    "ao", "SIZES", "DTYPE", "LR", "OPTIMIZERS", "BACKENDS", "ADAM_BYTES", "AXPY_BYTES",
    "make_data", "warm_up", "selected_backend", "Stepper", "OptimizerStep", "Axpy", "TorchFusedAdam",
    "AdamKernel", "FinitenessPrePass", "CONTENDERS", "RATIOS", "interleaved", "medians_ms",
    "ratios_from", "measure", "measure_grid", "env_info", "STEP_BYTES", "set_threads",
]

SIZES = {"1M": 1_000_000, "10M": 10_000_000}
THREADS_ENV = "ARRAYOPT_BENCH_THREADS"
DTYPE = np.float32
LR = 1e-3

OPTIMIZERS = {
    "sgd_momentum": lambda: ao.sgd(LR, momentum=0.9),
    "adam": lambda: ao.adam(learning_rate=LR),
    "adamw": lambda: ao.adamw(learning_rate=LR),
    "adagrad": lambda: ao.adagrad(LR),
}
BACKENDS = ("numba_cpu", "reference")

ADAM_BYTES = 28  # per float32 param: read p, g, m, v (16) + write p, m, v (12)
AXPY_BYTES = 12  # per float32 element: read a, b (8) + write a (4)
# bytes a step must stream per float32 param (the finiteness pre-pass's extra read of g not counted)
STEP_BYTES = {"sgd_momentum": 20, "adam": ADAM_BYTES, "adamw": ADAM_BYTES, "adagrad": 20}


def set_threads(n: int | None) -> None:
    """Use ``n`` threads in Numba's and torch's pools (None: leave the defaults).

    On a small, oversubscribed machine a 2-thread parallel region waits whenever its
    worker thread is descheduled (a scheduler time slice, ~ms per region); 1 thread
    then gives steadier ratios. ``ARRAYOPT_BENCH_THREADS=n`` applies this at import.
    """
    if n is None:
        return
    n = int(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


if os.environ.get(THREADS_ENV):
    set_threads(os.environ[THREADS_ENV])


# ---------------------------------------------------------------- data


def make_data(n: int, dtype=DTYPE, seed: int = 0):
    """Params ~ N(0, 1) and grads ~ N(0, 1e-4), both fully written (pages touched)."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n, dtype=dtype)
    g = rng.standard_normal(n, dtype=dtype)
    g *= dtype(1e-2)
    return p, g


@njit(parallel=True, fastmath=True, cache=True)
def axpy(a, b, s):
    """In place ``a += s*b``: the same access pattern as an optimizer step (no write-allocate)."""
    for i in prange(a.size):
        a[i] += s * b[i]


_warm = set()


def warm_up(dtype=DTYPE) -> None:
    """Compile (or load from Numba's cache) the axpy probe for ``dtype``.

    The optimizer kernels are warmed by each stepper's own untimed steps at the
    benchmark's size, on purpose: a warm-up on small arrays would compile the
    library's small-leaf (serial) kernel variants first, which changes what the
    on-disk Numba cache holds for the large-leaf variants (Numba's cache key does
    not include ``parallel=``).
    """
    key = np.dtype(dtype).name
    if key in _warm:
        return
    a, b = make_data(1024, dtype, seed=123)
    axpy(a, b, dtype(1e-7))
    _warm.add(key)


def selected_backend(opt, p, g, state):
    """Name of the backend ``opt.step`` dispatches to for these arrays (None: the reference)."""
    from arrayopt import _xp

    ns = _xp.resolve(p)
    b = ao.dispatch.select(opt.kernel_op, ns, [p], [g], *[state[k] for k in opt.state_names])
    return None if b is None else b.name


# ---------------------------------------------------------------- steppers (callables)


class Stepper:
    """A callable that runs ``self.opt.step`` once on ``self.p``/``self.g``, on ``self.backend``."""

    def __call__(self):
        if self.backend == "reference":
            with ao.dispatch.use_backend("reference"):
                self.p, self.state = self.opt.step(self.p, self.g, self.state)
        else:
            self.p, self.state = self.opt.step(self.p, self.g, self.state)


class OptimizerStep(Stepper):
    """``opt.step`` of one optimizer on one flat float32 param of ``n`` elements.

    ``backend="numba_cpu"``: the automatic dispatch, checked to pick the fused
    kernel (raises NotImplementedError, asv's skip, when it would not);
    ``backend="reference"``: under ``ao.dispatch.use_backend("reference")``.
    """

    def __init__(self, opt_name: str, backend: str, n: int, dtype=DTYPE, seed: int = 0, warmup: int = 2):
        if backend not in BACKENDS:
            raise ValueError(f"backend: {backend!r} not in {BACKENDS}")
        self.opt = OPTIMIZERS[opt_name]()
        self.backend = backend
        self.p, self.g = make_data(n, dtype, seed)
        self.state = self.opt.init(self.p)
        if backend == "numba_cpu":
            got = selected_backend(self.opt, self.p, self.g, self.state)
            if got != "numba_cpu":
                raise NotImplementedError(f"numba_cpu backend not selected (got {got!r})")
        for _ in range(warmup):  # compiles/loads the kernels for this size; reference allocates
            self()


class Axpy:
    """The bandwidth probe: Numba prange ``a += s*b`` on two arrays of ``n`` elements."""

    def __init__(self, n: int, dtype=DTYPE, seed: int = 1, warmup: int = 2):
        self.a = np.ones(n, dtype=dtype)
        self.b = np.random.default_rng(seed).standard_normal(n, dtype=dtype)
        self.s = dtype(1e-7)
        for _ in range(warmup):
            self()

    def __call__(self):
        axpy(self.a, self.b, self.s)


class TorchFusedAdam:
    """``torch.optim.Adam(fused=True)`` on one float32 CPU tensor of ``n`` elements (same data)."""

    def __init__(self, n: int, seed: int = 0, warmup: int = 2):
        try:
            import torch
        except ImportError as e:
            raise NotImplementedError("torch is not installed") from e
        p, g = make_data(n, DTYPE, seed)
        self.param = torch.nn.Parameter(torch.from_numpy(p))
        self.param.grad = torch.from_numpy(g)
        try:
            self.opt = torch.optim.Adam([self.param], lr=LR, betas=(0.9, 0.999), eps=1e-8, fused=True)
            for _ in range(warmup):  # also allocates exp_avg/exp_avg_sq
                self()
        except (RuntimeError, TypeError, ValueError) as e:
            raise NotImplementedError(f"torch fused Adam unavailable on CPU: {e}") from e

    def __call__(self):
        self.opt.step()


class AdamKernel:
    """The Numba Adam kernel called directly, with (``check=True``) or without the
    finiteness pre-pass that ``opt.step`` runs first (``BACKEND.all_finite`` over the grad)."""

    def __init__(self, n: int, check: bool, dtype=DTYPE, seed: int = 0, warmup: int = 2):
        from arrayopt.backends.numba_cpu import BACKEND

        try:
            from arrayopt.backends.numba_cpu import first_order as kernels
        except ImportError:  # commits before one module per op
            from arrayopt.backends.numba_cpu import kernels

        self.backend = BACKEND
        try:  # the kernel the backend picks for a leaf of n elements
            self.kernel = kernels.kernel_for("adam", 2, n)
        except TypeError:  # older kernel_for(op, n_states)
            self.kernel = kernels.kernel_for("adam", 2)
        self.check = check
        self.p, self.g = make_data(n, dtype, seed)
        self.m = np.full(n, 0.0, dtype=dtype)
        self.v = np.full(n, 0.0, dtype=dtype)
        raw = ao.adam(learning_rate=LR).step_scalars(1, LR)
        self.scalars = tuple(s if isinstance(s, bool) else dtype(s) for s in raw)
        self.g_views = [self.g]
        for _ in range(warmup):
            self()

    def __call__(self):
        if self.check and not self.backend.all_finite(self.g_views):
            raise FloatingPointError("non-finite gradient")
        self.kernel(self.p, self.g, self.m, self.v, *self.scalars)


class FinitenessPrePass:
    """The read-only finiteness pre-pass alone (``BACKEND.all_finite`` on one grad)."""

    def __init__(self, n: int, dtype=DTYPE, seed: int = 0, warmup: int = 2):
        from arrayopt.backends.numba_cpu import BACKEND

        self.backend = BACKEND
        self.g_views = [make_data(n, dtype, seed)[1]]
        for _ in range(warmup):
            self()

    def __call__(self):
        if not self.backend.all_finite(self.g_views):
            raise FloatingPointError("non-finite gradient")


# name -> (builder(n), timed calls per round)
CONTENDERS = {
    "numba_adam": (lambda n: OptimizerStep("adam", "numba_cpu", n), 3),
    "reference_adam": (lambda n: OptimizerStep("adam", "reference", n), 1),
    "torch_fused_adam": (lambda n: TorchFusedAdam(n), 3),
    "kernel_adam_check": (lambda n: AdamKernel(n, check=True), 3),
    "kernel_adam_nocheck": (lambda n: AdamKernel(n, check=False), 3),
    "prepass_only": (lambda n: FinitenessPrePass(n), 3),
    "axpy": (lambda n: Axpy(n), 3),
}

# ratio name -> (numerator, denominator); "floor" is axpy_ms * ADAM_BYTES / AXPY_BYTES
RATIOS = {
    "numba_adam/floor": ("numba_adam", "floor"),
    "numba_kernel/floor": ("kernel_adam_nocheck", "floor"),
    "reference_adam/floor": ("reference_adam", "floor"),
    "torch_fused_adam/floor": ("torch_fused_adam", "floor"),
    "numba_adam/torch_fused_adam": ("numba_adam", "torch_fused_adam"),
    "kernel_check/kernel_nocheck": ("kernel_adam_check", "kernel_adam_nocheck"),
}


# ---------------------------------------------------------------- measurement


def interleaved(contenders: dict, rounds: int, steps=3) -> dict:
    """Time each callable separately, round-robin over ``rounds`` rounds (the order
    rotates each round); ``steps`` timed calls per contender per round (an int or
    a dict name -> int). Returns name -> list of seconds."""
    names = list(contenders)
    samples = {k: [] for k in names}
    timer = time.perf_counter
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = contenders[name]
            reps = steps.get(name, 3) if isinstance(steps, dict) else steps
            for _ in range(reps):
                t0 = timer()
                fn()
                samples[name].append(timer() - t0)
    return samples


def medians_ms(samples: dict) -> dict:
    return {k: 1e3 * statistics.median(v) for k, v in samples.items() if v}


def ratios_from(med_ms: dict) -> dict:
    """Ratio name -> value (None when a contender is missing) from medians in ms."""
    vals = dict(med_ms)
    if "axpy" in vals:
        vals["floor"] = vals["axpy"] * ADAM_BYTES / AXPY_BYTES
    out = {}
    for name, (num, den) in RATIOS.items():
        out[name] = vals[num] / vals[den] if num in vals and den in vals else None
    return out


def measure(n: int, names=None, rounds: int = 15, steps=None, skipped=None) -> dict:
    """Build the ``names`` contenders (default: all) for ``n`` float32 params, time them
    interleaved in this process, and return ``{"n", "samples_s", "ms", "floor_ms",
    "axpy_gbs", "ratios", "skipped"}``. Contenders whose setup raises
    NotImplementedError (torch missing) are left out and listed in ``skipped``."""
    names = list(CONTENDERS) if names is None else list(names)
    warm_up()
    built, skipped = {}, dict(skipped or {})
    for name in names:
        try:
            built[name] = CONTENDERS[name][0](n)
        except NotImplementedError as e:
            skipped[name] = str(e)
    per = {name: CONTENDERS[name][1] for name in built}
    if steps is not None:
        per.update(steps if isinstance(steps, dict) else {k: steps for k in per})
    samples = interleaved(built, rounds, per)
    med = medians_ms(samples)
    out = {"n": n, "samples_s": samples, "ms": med, "ratios": ratios_from(med), "skipped": skipped}
    if "axpy" in med:
        out["floor_ms"] = med["axpy"] * ADAM_BYTES / AXPY_BYTES
        out["axpy_gbs"] = AXPY_BYTES * n / (med["axpy"] * 1e-3) / 1e9
    return out


def measure_grid(n: int, optimizers=None, backends=BACKENDS, rounds: int = 7, steps: int = 2) -> dict:
    """Every optimizer x backend ``opt.step`` for ``n`` params, plus the axpy probe, interleaved
    in this process. Returns ``{"n", "ms": {(opt, backend): median ms}, "axpy_ms",
    "x_floor": {(opt, backend): ms / (STEP_BYTES[opt] * n / axpy bandwidth)}}``."""
    optimizers = list(OPTIMIZERS) if optimizers is None else list(optimizers)
    warm_up()
    built = {}
    for o in optimizers:
        for b in backends:
            try:
                built[(o, b)] = OptimizerStep(o, b, n)
            except NotImplementedError:
                pass
    built["axpy"] = Axpy(n)
    per = {k: (1 if k[1] == "reference" and n >= 5_000_000 else steps) if k != "axpy" else steps
           for k in built}
    med = medians_ms(interleaved(built, rounds, per))
    axpy_ms = med.pop("axpy")
    x_floor = {k: v / (axpy_ms * STEP_BYTES[k[0]] / AXPY_BYTES) for k, v in med.items()}
    return {"n": n, "ms": med, "axpy_ms": axpy_ms, "x_floor": x_floor}


def env_info() -> dict:
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                     if ln.startswith("model name")), platform.processor() or "?")
        if os.path.exists("/proc/cpuinfo") else platform.processor(),
        "ncpu": os.cpu_count(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "arrayopt": getattr(ao, "__version__", "?"),
    }
    try:
        info["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        info["numba_threading_layer"] = None
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info
