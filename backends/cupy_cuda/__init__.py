"""CuPy CUDA backend: fused in-place kernels for CuPy arrays and torch CUDA tensors.

Accepted arrays (everything else takes the reference path):

- CuPy arrays, float32/float64, C-contiguous, all on one device; kernels run on CuPy's
  current stream of that device;
- torch CUDA tensors, float32/float64, contiguous, all on one device, reached zero-copy
  with ``cupy.from_dlpack(t.detach())``; kernels run on torch's current stream through
  ``cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)``, so they are
  ordered with the caller's torch work and no synchronisation is added.

Each step is one pass per leaf over params, grads and state, with the arithmetic of
``arrayopt.first_order`` in the same order (``first_order.cu``)::

    sgd       d = g + λθ;  θ ← θ - η d                          (momentum 0, no state)
              d = g + λθ;  b ← μ b + d;  θ ← θ - η (d + μ b | b)  (momentum, Nesterov)
    adam      g ← g + l2 θ;  θ ← θ·decay;  m ← m + (1-β1)(g - m);  v ← β2 v + (1-β2) g²
              θ ← θ - step_size · m / (√v / √(1-β2^t) + ε)
    adagrad   d = g + λθ;  s ← s + d²;  θ ← θ - η d / (√s + ε)

SONew (``ao.sonew``, op ``"sonew"``, :meth:`CupyCUDA.run_sonew`; ``sonew.cu``): the fused
step of ``backends/numba_cpu/sonew.py`` with one thread per row: statistics, band ∞-norm
(relative eps), then for ``band=1`` one kernel for the tridiagonal factor with edge removal
and ``u = X m̂``, for other bands (``<= 32``) one batched kernel factoring every row's
``b×b`` window with the bandwidth fallback and one for ``u = L t``, then the grafted update.
Global norms are block reductions plus atomics and stay on the device; the removal counts
of all leaves come back in one device-to-host read per step.

Eva and Eva-f (``ao.eva``, op ``"eva"``, ``eva.py``; ``eva.cu``): the two passes of
``backends/numba_cpu/eva.py`` per preconditioned weight (``(Gā)_r``, ``‖G_r‖²`` one thread per
row; then the rank-one correction fused into the write of ``P`` and the SGD-momentum step),
the per-layer scalars in one device-to-host read per step for the KL factor; ``"in_out"``
weights and Eva-s take the reference.

Sketchy (``ao.sketchy``, op ``"sketchy"``, ``sketchy.py``; ``sketchy.cu``): the low-rank apply
through the namespace (cuBLAS), then the graft norms (float64 partial sums, one device-to-host
read per step), momentum, weight decay and the parameter write of ``backends/numba_cpu/sketchy.py``.

Eigenvalue-corrected Shampoo (``ao.shampoo(preconditioner="eigenvalue_corrected")``, op
``"shampoo_corrected"``, ``shampoo.py``; ``shampoo.cu``): the rotations into the eigenbases and
back through the namespace (cuBLAS), between them one launch per block for the eigenbasis second
moment and the scaled step of ``backends/numba_cpu/shampoo.py``.

The finiteness pre-pass is one read-only counting kernel per gradient leaf into one
shared counter and a single device-to-host read. Results equal the reference up to
float rounding, in fact bit for bit: every device operation is an IEEE ``.rn``
instruction (no FMA contraction, no flush-to-zero despite CuPy's ``-ftz=true``).

Scalars reach the kernels typed (``numpy.float32`` for float32 arrays, ``numpy.float64``
for float64, SGD's ``nesterov`` as ``numpy.int32`` 0/1); see ``_loader``. CuPy and
torch are imported only when needed, never at module import. The source is compiled
once per process and device by NVRTC (CuPy recompiles template modules with
``name_expressions`` in every process: about a second, on the first step).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import numpy as np

from . import _loader

__all__ = ["BACKEND", "CupyCUDA"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _importable(name: str) -> bool:
    mod = sys.modules.get(name, False)
    if mod is not False:
        return mod is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _probe() -> tuple:
    """``(available, reason)``: cupy imports and sees at least one CUDA device."""
    if not _importable("cupy"):
        return False, "cupy is not installed"
    try:
        import cupy
    except Exception as e:  # broken install, missing CUDA libraries, ...
        return False, f"cupy does not import ({type(e).__name__}: {e})"
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:  # no driver, no device
        return False, f"no CUDA device ({type(e).__name__}: {e})"
    if n <= 0:
        return False, "no CUDA device"
    return True, ""


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


@contextlib.contextmanager
def _on_device_stream(x):
    """Make ``x``'s device current for CuPy and, for a torch tensor, torch's current stream."""
    import cupy

    with contextlib.ExitStack() as stack:
        if _is_torch(x):
            import torch

            index = x.device.index if x.device.index is not None else torch.cuda.current_device()
            stack.enter_context(cupy.cuda.Device(index))
            ptr = torch.cuda.current_stream(x.device).cuda_stream
            stream = cupy.cuda.Stream.null if ptr == 0 else cupy.cuda.ExternalStream(ptr, index)
            stack.enter_context(stream)
        else:
            stack.enter_context(cupy.cuda.Device(x.device.id))
        yield


def _band_fits(b) -> bool:
    """the kernels' window arrays hold at most SONEW_MAX_BAND = 32"""
    return b <= _loader.SONEW_MAX_BAND


class _Views(list):
    """Flat CuPy views of one group of leaves; ``anchor`` is the first original leaf (it
    names the device and, for torch, the stream the views belong to)."""

    anchor = None


class CupyCUDA:
    """The ``cupy_cuda`` backend (see the module docstring)."""

    name = "cupy_cuda"
    ops = frozenset({"sgd", "adam", "adagrad", "sonew", "eva", "sketchy", "shampoo_corrected"})
    # the one place that says which options of each op's step description the kernels fuse
    capabilities = {
        "sgd": {}, "adam": {}, "adagrad": {},
        "sonew": {
            # every graft and fallback block-local (sonew_block_step); whole tensors: not
            # rmsprop_normalized nor the Adam fallback (refuse_options)
            "band": _band_fits,
            "order": frozenset({"C"}),         # no first-axis-fastest flattening in sonew.cu
        },
        # eva.cu reads a weight as (d_out, d_in) rows; Eva-s has no kernel
        "eva": {"variant": frozenset({"eva", "eva_f"}), "weight_layout": frozenset({"out_in"})},
        # as numba_cpu: rmsprop_normalized needs ‖g‖ before its accumulator, sqrt_n takes the reference
        "sketchy": {"graft": frozenset({"none", "sgd", "adagrad", "rmsprop", "adam"})},
        # eigenvalue-corrected Shampoo: the eigenbasis second moment and scaled step, any β
        "shampoo_corrected": {},
    }

    def __init__(self):
        self._probed = None

    def _probe(self) -> tuple:
        if self._probed is None:
            try:
                self._probed = _probe()
            except Exception as e:  # never raise from available()
                self._probed = (False, f"probe failed ({type(e).__name__}: {e})")
        return self._probed

    def available(self) -> bool:
        return self._probe()[0]

    def reason(self) -> str:
        ok, why = self._probe()
        if not ok:
            return why
        return ("CuPy arrays and torch CUDA tensors (float32/float64, C-contiguous), "
                "on the caller's stream")

    # ---------------------------------------------------------------- acceptance

    def refuse_options(self, op, step):
        from ...dispatch import check_capabilities

        why = check_capabilities(self.capabilities, op, step)
        if why is None and op == "sonew" and step.block_size is None:
            if step.graft == "rmsprop_normalized":
                return "graft='rmsprop_normalized' is not fused for whole tensors (block_size=None)"
            if step.small_param_fallback != "sonew":
                return (f"small_param_fallback={step.small_param_fallback!r} is not fused for whole "
                        "tensors (block_size=None)")
        return why

    def refuse_arrays(self, ns, *groups):
        """``None`` if the kernels take these arrays, else why not."""
        if ns.library not in ("cupy", "torch"):
            return f"{ns.library} arrays are not taken (CuPy arrays and torch CUDA tensors only)"
        if not groups or not groups[0]:
            return "no params"
        if not self.available():
            return self.reason()
        params = groups[0]
        if any(len(group) != len(params) for group in groups[1:]):
            return "groups of different lengths"
        ok = self._accepts_cupy(groups) if ns.library == "cupy" else self._accepts_torch(groups)
        if not ok:
            return "arrays not all float32/float64, contiguous, on one CUDA device"
        for i, p in enumerate(params):  # each leaf's grads and state match its param
            for group in groups[1:]:
                a = group[i]
                if a.dtype != p.dtype:
                    return f"leaf {i}: grads or state dtype {a.dtype} differs from the params' {p.dtype}"
                # SONew's band state is (p.size, b+1), b <= _loader.SONEW_MAX_BAND
                if a.shape != p.shape and not _loader.is_sonew_band(a, p):
                    return f"leaf {i}: state shape {tuple(a.shape)} (band > {_loader.SONEW_MAX_BAND}?)"
        return None

    def accepts(self, ns, *groups) -> bool:
        """``refuse_arrays(ns, *groups) is None``."""
        return self.refuse_arrays(ns, *groups) is None

    @staticmethod
    def _accepts_cupy(groups) -> bool:
        import cupy

        device = None
        for group in groups:
            for a in group:
                if not isinstance(a, cupy.ndarray) or a.dtype not in _FLOATS:
                    return False
                if not a.flags.c_contiguous:
                    return False
                if device is None:
                    device = a.device.id
                elif a.device.id != device:
                    return False
        return True

    @staticmethod
    def _accepts_torch(groups) -> bool:
        import torch

        floats = (torch.float32, torch.float64)
        device = None
        for group in groups:
            for a in group:
                if not isinstance(a, torch.Tensor) or a.device.type != "cuda":
                    return False
                if a.dtype not in floats or not a.is_contiguous() or a.is_conj() or a.is_neg():
                    return False
                if device is None:
                    device = a.device
                elif a.device != device:
                    return False
        return True

    # ---------------------------------------------------------------- kernels

    def views(self, arrays) -> list:
        """Flat CuPy views sharing memory with ``arrays`` (zero-copy DLPack for torch)."""
        out = _Views()
        if not arrays:
            return out
        out.anchor = arrays[0]
        if _is_torch(arrays[0]):
            import cupy

            # made on torch's stream, so the DLPack exchange needs no extra synchronisation
            with _on_device_stream(arrays[0]):
                out.extend(cupy.from_dlpack(a.detach()).reshape(-1) for a in arrays)
        else:
            out.extend(a.reshape(-1) for a in arrays)
        return out

    def all_finite(self, views) -> bool:
        """One counting kernel per leaf into a shared counter, then one device-to-host read."""
        if not any(v.size for v in views):
            return True
        import cupy

        anchor = getattr(views, "anchor", None)
        with _on_device_stream(anchor if anchor is not None else views[0]):
            device = views[0].device.id
            blocks = _loader.max_blocks(device)
            counter = cupy.zeros(1, dtype=np.uint64)
            for v in views:
                if v.size:
                    kernel = _loader.function(_loader.COUNT_KERNEL, v.dtype, device)
                    grid, block = _loader.launch_shape(v.size, blocks)
                    kernel(grid, block, _loader.count_args(v, counter))
            return int(counter.get()[0]) == 0

    def run(self, op, params, grads, states, step, g_views=None):
        """Update ``params`` and ``states`` in place with the ``op`` kernel, leaf by leaf.

        ``step``: the op's frozen step description (first-order ops: the ``step_scalars``
        tuple; ``"sonew"``: a ``SONewStep`` with ``states = [mus, bands]``, returning per-leaf
        ``(removed_edges, fallback_rows)``; ``"eva"``: an ``EvaStep`` with ``states = [momentum
        buffers or None, layers]``, returning ``False`` (nothing written) on a non-finite gradient;
        ``"shampoo_corrected"``: a ``CorrectedMomentStep`` with ``params`` the rotated blocks and
        ``states = [second moments]``, returning the scaled blocks, ``shampoo.py``).
        """
        if op == "sonew":
            return self.run_sonew(step, params, grads, *states, g_views=g_views)
        if op == "sketchy":  # states = [graft accumulators or None, momentum or None, directions D]
            from .sketchy import run as run_sketchy

            if not params:
                return None
            with _on_device_stream(params[0]):
                return run_sketchy(self, step, params, grads, states[0], states[1], states[2], g_views)
        if op == "shampoo_corrected":  # params = rotated blocks Ĝ, states = [second moments D]
            from .shampoo import run as run_shampoo

            if not params:
                return []
            with _on_device_stream(params[0]):
                return run_shampoo(self, step, params, states[0])
        if op == "eva":  # states = [momentum buffers or None, per-layer (i, b, ā, ḡ)]
            from .eva import run as run_eva

            if not params:
                return None
            with _on_device_stream(params[0]):
                return run_eva(self, step, params, grads, states[0], states[1], g_views)
        if not params:
            return None
        scalars = step
        base = _loader.kernel_base(op, len(states))
        with _on_device_stream(params[0]):
            p_views = self.views(params)
            g_views = g_views if g_views is not None else self.views(grads)
            s_views = [self.views(s) for s in states]
            device = p_views[0].device.id
            blocks = _loader.max_blocks(device)
            for i, (p, g) in enumerate(zip(p_views, g_views)):
                if p.size == 0:
                    continue
                kernel = _loader.function(base, p.dtype, device)
                grid, block = _loader.launch_shape(p.size, blocks)
                kernel(grid, block, _loader.kernel_args(p, g, [s[i] for s in s_views], scalars))

    def run_sonew(self, step, params, grads, mus, bands, nus=None, g_views=None) -> list:
        """SONew's fused step (``sonew.cu``), in place on every leaf; returns per-leaf
        ``(removed_edges, fallback_rows)`` as ints (one device-to-host read for all leaves)."""
        if not params:
            return []
        import cupy

        with _on_device_stream(params[0]):
            p_views = self.views(params)
            g_views = g_views if g_views is not None else self.views(grads)
            m_views = self.views(mus)
            b_views = self.views(bands)
            device = p_views[0].device.id
            blocks = _loader.max_blocks(device)
            k = len(p_views)
            norms = cupy.zeros((k, 2), dtype=np.float64)
            counts = cupy.zeros((k, 2), dtype=np.uint64)
            rowmax: dict = {}
            nu_views = self.views(nus) if nus is not None else [None] * k
            for i, (p, g, m, band) in enumerate(zip(p_views, g_views, m_views, b_views)):
                n = p.size
                if n == 0:
                    continue
                b = int(bands[i].shape[1]) - 1
                if step.block_size is not None:  # block-local: one launch, one thread block per block
                    nu = nu_views[i] if nu_views[i] is not None else cupy.zeros(1, dtype=p.dtype)
                    base, grid, block, args = _loader.sonew_block_launch(
                        step, p, g, m, band, nu, b, counts[i], cupy.empty(max(1, n * b), dtype=p.dtype),
                        cupy.empty(n, dtype=p.dtype), cupy.empty(n, dtype=p.dtype), len(params[i].shape) <= 1)
                    _loader.function(base, p.dtype, device)(grid, block, args)
                    continue
                rm = rowmax.get(p.dtype)
                if rm is None:
                    rm = rowmax[p.dtype] = cupy.zeros(k, dtype=p.dtype)
                u = None if step.graft == "none" else cupy.empty(n, dtype=p.dtype)
                psi = t = None
                if b != 1:
                    psi, t = cupy.empty(n * b, dtype=p.dtype), cupy.empty(n, dtype=p.dtype)
                grid, block = _loader.launch_shape(n, blocks)
                for base, args in _loader.sonew_launches(step, p, g, m, band, b,
                                                          norms[i], counts[i], rm[i:i + 1],
                                                          u, psi, t):
                    _loader.function(base, p.dtype, device)(grid, block, args)
            host = counts.get()
        return [(int(e), int(f)) for e, f in host]


BACKEND = CupyCUDA()
