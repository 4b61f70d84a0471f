"""CuPy CUDA backend: fused in-place kernels for CuPy arrays and torch CUDA tensors.

Accepted arrays (everything else takes the reference path):

- CuPy arrays, float32/float64, C-contiguous, all on one device; kernels run on CuPy's
  current stream of that device;
- torch CUDA tensors, float32/float64, contiguous, all on one device, reached zero-copy
  with ``cupy.from_dlpack(t.detach())``; kernels run on torch's current stream through
  ``cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)``, so they are
  ordered with the caller's torch work and no synchronisation is added.

The ops and the options they fuse come from the op modules of this package
(:func:`backends._optable.collect`): ``first_order`` (``sgd``, ``adam``, ``adagrad``), ``sonew``,
``eva``, ``sketchy`` and ``shampoo`` (``shampoo_corrected``), each a ``.py`` driver declaring
``OPS`` and ``run`` beside its ``.cu`` kernels, compiled by ``_loader``. An op module may also
define ``refuse_options(op, step)`` for a rule ``OPS`` cannot state (SONew's whole-tensor
limits). :meth:`CupyCUDA.run` enters the device and stream of the first param and calls the
op's ``run``.

The finiteness pre-pass is one read-only counting kernel per gradient leaf into one
shared counter and a single device-to-host read. Results equal the reference up to
float rounding, in fact bit for bit: every device operation is an IEEE ``.rn``
instruction (no FMA contraction, no flush-to-zero despite CuPy's ``-ftz=true``).

CuPy and torch are imported only when needed, never at module import. Each ``.cu`` is
compiled once per process and device by NVRTC (CuPy recompiles template modules with
``name_expressions`` in every process: about a second, on the first step).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from types import MappingProxyType

import numpy as np

from .._optable import collect
from . import first_order
from ._loader import launch_shape, max_blocks
from .sonew import SONEW_MAX_BAND, is_band_state

__all__ = ["BACKEND", "CupyCUDA"]

# op -> OpEntry(module, capabilities), from the op modules of this package
_TABLE = collect(__name__, __path__)

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


class _Views(list):
    """Flat CuPy views of one group of leaves; ``anchor`` is the first original leaf (it
    names the device and, for torch, the stream the views belong to)."""

    anchor = None


class CupyCUDA:
    """The ``cupy_cuda`` backend (see the module docstring)."""

    name = "cupy_cuda"
    # the op table: which module runs each op; the options each op fuses are its module's OPS
    table = _TABLE
    ops = frozenset(_TABLE)
    capabilities = MappingProxyType({op: entry.capabilities for op, entry in _TABLE.items()})

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
        from .._optable import check_capabilities

        why = check_capabilities(self.capabilities, op, step)
        refuse = getattr(self.table[op].module, "refuse_options", None) if op in self.table else None
        if why is None and refuse is not None:
            why = refuse(op, step)
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
                # SONew's band state is (p.size, b+1), b <= SONEW_MAX_BAND
                if a.shape != p.shape and not is_band_state(a, p):
                    return f"leaf {i}: state shape {tuple(a.shape)} (band > {SONEW_MAX_BAND}?)"
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
            blocks = max_blocks(device)
            counter = cupy.zeros(1, dtype=np.uint64)
            for v in views:
                if v.size:
                    kernel = first_order.KERNELS.function(first_order.COUNT_KERNEL, v.dtype, device)
                    grid, block = launch_shape(v.size, blocks)
                    kernel(grid, block, first_order.count_args(v, counter))
            return int(counter.get()[0]) == 0

    def run(self, op, params, grads, states, step, g_views=None):
        """Update ``params`` and ``states`` in place with ``op``'s kernels: its module's ``run``,
        on the device and stream of the first param.

        ``step``: the op's frozen step description (first-order ops: the ``step_scalars``
        tuple; ``"sonew"``: a ``SONewStep`` with ``states = [mus, bands]``, returning per-leaf
        ``(removed_edges, fallback_rows)``; ``"eva"``: an ``EvaStep`` with ``states = [momentum
        buffers or None, layers]``, returning ``False`` (nothing written) on a non-finite gradient;
        ``"sketchy"``: a ``SketchyStep`` with ``states = [graft accumulators or None, momentum or
        None, directions D]``; ``"shampoo_corrected"``: a ``CorrectedMomentStep`` with ``params``
        the rotated blocks and ``states = [second moments]``, returning the scaled blocks).
        """
        entry = self.table.get(op)
        if entry is None:
            raise ValueError(f"cupy_cuda: no kernel for op {op!r} (ops: {', '.join(sorted(self.ops))})")
        with _on_device_stream(params[0]) if params else contextlib.nullcontext():
            return entry.module.run(self, op, params, grads, states, step, g_views)


BACKEND = CupyCUDA()
