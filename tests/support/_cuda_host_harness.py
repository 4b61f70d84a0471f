"""Host-side checks of the CUDA backend without a GPU (``backends/cupy_cuda/README.md``).

- :func:`compile_cubin`: ``nvcc -arch=sm_90 --cubin`` of a ``.cu`` file with the options
  CuPy uses (ours plus CuPy's ``-ftz=true``), keeping the PTX for inspection.
- :func:`build_harness` / :class:`HostHarness`: the ``.cu`` compiled for the host with
  ``-DARRAYOPT_HOST_HARNESS`` into a shared library, loaded with ctypes. Its functions
  ``host_<kernel>_<f32|f64>`` take exactly the kernels' parameter lists, and
  :meth:`HostHarness.launch` packs arguments by their NumPy types the way CuPy does, so a
  mistyped scalar gives wrong numbers here as it would on the device.
- :func:`fake_cupy`: a minimal stand-in for the ``cupy`` module whose ``RawModule`` runs
  the host harness, so the backend's Python code (views, finiteness pre-pass, launches)
  runs end to end on NumPy arrays; :func:`fresh_loader` empties the loader's memos for it.
- :func:`find_nvrtc` / :func:`nvrtc_compile`: NVRTC through ctypes, called as CuPy calls it
  (options, name expressions, lowered names), where a libnvrtc is found.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CU_DIR = ROOT / "backends" / "cupy_cuda"


def cu_files() -> list:
    return sorted(CU_DIR.glob("*.cu"))


def nvcc() -> str | None:
    return shutil.which("nvcc")


def _run(cmd: list) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def compile_cubin(src: Path, out_dir: Path, options=()) -> tuple:
    """``nvcc -arch=sm_90 --cubin``; returns ``(completed_process, cubin_path, ptx_path)``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cubin = out_dir / (src.stem + ".cubin")
    cmd = [nvcc(), "-arch=sm_90", "--cubin", *options, "--keep", "--keep-dir", str(out_dir),
           "-o", str(cubin), str(src)]
    proc = _run(cmd)
    ptx = sorted(out_dir.glob(src.stem + "*.ptx"))
    return proc, cubin, (ptx[0] if ptx else None)


def build_harness(src: Path, out_dir: Path) -> Path:
    """Compile ``src`` for the host as a shared library (no FMA contraction on either side)."""
    lib = out_dir / ("lib" + src.stem + "_harness.so")
    cmd = [nvcc(), "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-ffp-contract=off", "-O2",
           "-fmad=false", "-DARRAYOPT_HOST_HARNESS", "-o", str(lib), str(src)]
    proc = _run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"host harness build failed:\n{' '.join(cmd)}\n{proc.stderr}")
    return lib


# ---------------------------------------------------------------- ctypes, CuPy-style packing

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_CTYPE_SUFFIX = {"float": "f32", "double": "f64"}


def pack(arg):
    """One kernel argument as CuPy passes it: arrays by pointer, NumPy scalars by their exact
    type, Python bool/int/float as bool/long long/double."""
    if isinstance(arg, np.ndarray):
        return ctypes.c_void_p(arg.ctypes.data)
    if isinstance(arg, np.generic):
        table = {np.float32: ctypes.c_float, np.float64: ctypes.c_double,
                 np.int32: ctypes.c_int32, np.int64: ctypes.c_int64,
                 np.uint64: ctypes.c_uint64, np.bool_: ctypes.c_bool}
        return table[type(arg)](arg.item())
    if isinstance(arg, bool):
        return ctypes.c_bool(arg)
    if isinstance(arg, int):
        return ctypes.c_int64(arg)
    if isinstance(arg, float):
        return ctypes.c_double(arg)
    raise TypeError(f"cannot pass {type(arg).__name__} to a kernel")


_BUILT: dict = {}


def shared_harness(src: Path, tmp_path_factory) -> "HostHarness":
    """The host build of ``src``, made once per test session (several modules launch the
    first-order kernels: the finiteness pre-pass, the SGD leaves)."""
    key = Path(src).resolve()
    if key not in _BUILT:
        _BUILT[key] = HostHarness(build_harness(src, tmp_path_factory.mktemp(key.stem + "_harness")))
    return _BUILT[key]


class HostHarness:
    """The host build of a ``.cu`` file, called with kernel-style arguments."""

    def __init__(self, lib_path: Path):
        self.lib = ctypes.CDLL(str(lib_path))

    def symbol(self, base: str, dtype) -> str:
        return f"host_{base}_{_SUFFIX[np.dtype(dtype)]}"

    def launch(self, base: str, dtype, args) -> None:
        fn = getattr(self.lib, self.symbol(base, dtype))
        fn.restype = None
        fn(*[pack(a) for a in args])

    def launch_expression(self, expression: str, args) -> None:
        """Run a kernel named by a CuPy name expression, e.g. ``arrayopt::adam_step<float>``."""
        m = re.fullmatch(r"arrayopt::(\w+)<(float|double)>", expression)
        if m is None:
            raise ValueError(f"not a kernel name expression: {expression!r}")
        fn = getattr(self.lib, f"host_{m.group(1)}_{_CTYPE_SUFFIX[m.group(2)]}")
        fn.restype = None
        fn(*[pack(a) for a in args])

    def count_nonfinite(self, x: np.ndarray) -> int:
        counter = np.zeros(1, np.uint64)
        self.launch("count_nonfinite", x.dtype, (x, np.int64(x.size), counter))
        return int(counter[0])


class JoinedHarness(HostHarness):
    """Several ``.cu`` host builds as one fake device: a kernel runs from the build defining it."""

    def __init__(self, *harnesses: HostHarness):
        self.libs = tuple(h.lib for h in harnesses)

    def launch_expression(self, expression: str, args) -> None:
        base, ctype = expression[len("arrayopt::"):-1].split("<")
        name = f"host_{base}_{_CTYPE_SUFFIX[ctype]}"
        fn = getattr(next(lib for lib in self.libs if hasattr(lib, name)), name)
        fn.restype = None
        fn(*[pack(a) for a in args])


def fresh_loader(monkeypatch) -> None:
    """Empty memos of the backend's module loader for one test (a fake ``cupy`` compiles anew)."""
    from arrayopt.backends.cupy_cuda import _loader

    for name in ("_modules", "_functions", "_max_blocks"):
        monkeypatch.setattr(_loader, name, {})


def emulated_backend():
    """The CuPy backend taking the fake device's arrays (their namespace is NumPy's)."""
    from arrayopt.backends import cupy_cuda

    class EmulatedCuda(cupy_cuda.CupyCUDA):
        def refuse_arrays(self, ns, *groups):
            return None if all(isinstance(a, FakeArray) for a in groups[0]) else "not on the fake device"

    return EmulatedCuda()


# ---------------------------------------------------------------- a fake ``cupy`` module


class FakeDevice:
    id = 0


class FakeArray(np.ndarray):
    """A NumPy array that looks like a CuPy array on device 0."""

    @property
    def device(self):
        return FakeDevice()

    def get(self):
        return np.array(self, copy=True).view(np.ndarray)


def as_fake(a: np.ndarray) -> FakeArray:
    return a.view(FakeArray)


def fake_cupy(harness: HostHarness, launches: list | None = None) -> types.ModuleType:
    """A ``cupy`` stand-in whose kernels run on the host harness (device 0, one stream).

    ``launches`` (if given) records ``(name_expression, grid, block)`` for every launch.
    """
    cp = types.ModuleType("cupy")
    cp.ndarray = FakeArray
    cp.float32, cp.float64, cp.uint64 = np.float32, np.float64, np.uint64

    def zeros(shape, dtype=np.float64):
        return as_fake(np.zeros(shape, dtype))

    def empty(shape, dtype=np.float64):
        return as_fake(np.empty(shape, dtype))

    def asarray(a, dtype=None):
        return as_fake(np.asarray(a, dtype))

    def stack(arrays):
        return as_fake(np.stack([np.asarray(a) for a in arrays]))

    cp.zeros, cp.empty, cp.asarray, cp.stack = zeros, empty, asarray, stack

    class RawKernel:
        def __init__(self, expression):
            self.expression = expression

        def __call__(self, grid, block, args, shared_mem=0, stream=None):
            assert isinstance(grid, tuple) and isinstance(block, tuple), (grid, block)
            assert all(isinstance(v, int) and v > 0 for v in grid + block), (grid, block)
            assert block[0] <= 1024
            if launches is not None:
                launches.append((self.expression, grid, block))
            harness.launch_expression(self.expression, args)

    class RawModule:
        def __init__(self, *, code=None, path=None, options=(), name_expressions=None, **kw):
            assert code is not None and path is None
            # as CuPy: templates need name expressions, which need a -std option
            if name_expressions is not None and not any("-std=c++" in o for o in options):
                raise ValueError("need to specify C++ standard for compiling template code")
            self.code, self.options = code, tuple(options)
            self.name_expressions = tuple(name_expressions or ())

        def get_function(self, name):
            if name not in self.name_expressions:
                raise KeyError(f"{name!r} is not among the module's name_expressions")
            return RawKernel(name)

    cp.RawModule = RawModule

    class Device:
        def __init__(self, device_id=0):
            assert device_id == 0
            self.attributes = {"MultiProcessorCount": 2}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)

    class Stream(contextlib.nullcontext):
        pass

    Stream.null = Stream()
    cp.cuda = types.SimpleNamespace(Device=Device, runtime=runtime, Stream=Stream,
                                    ExternalStream=lambda ptr, device_id=-1: Stream())
    return cp


# ---------------------------------------------------------------- NVRTC, as CuPy calls it


def find_nvrtc() -> str | None:
    """Path of libnvrtc: ``$ARRAYOPT_NVRTC_LIB``, the ``nvidia-cuda-nvrtc`` wheel (on
    ``sys.path`` or ``$ARRAYOPT_NVRTC_PATH``), or the system library path."""
    env = os.environ.get("ARRAYOPT_NVRTC_LIB")
    if env and Path(env).is_file():
        return env
    roots = [Path(p) for p in os.environ.get("ARRAYOPT_NVRTC_PATH", "").split(os.pathsep) if p]
    try:
        spec = importlib.util.find_spec("nvidia")
        roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    except (ImportError, ValueError):
        pass
    roots += [Path(p) / "nvidia" for p in sys.path if p]
    for root in roots:
        for lib in sorted(root.glob("**/lib/libnvrtc.so*")):
            if ".alt." not in lib.name and "builtins" not in lib.name:
                return str(lib)
    name = ctypes.util.find_library("nvrtc")
    return name


def nvrtc_compile(lib_path: str, source: str, options, name_expressions) -> tuple:
    """Compile like ``cupy.RawModule``: returns ``(ptx, {expression: lowered name}, log)``;
    raises ``RuntimeError`` with the log when NVRTC rejects the source or an option."""
    # NVRTC dlopens libnvrtc-builtins by name: load the one beside it first
    for builtins in sorted(Path(lib_path).parent.glob("libnvrtc-builtins.so.*")):
        if ".alt." not in builtins.name:
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    nv = ctypes.CDLL(lib_path)
    c_char_pp = ctypes.POINTER(ctypes.c_char_p)

    def check(status, what, prog=None):
        if status != 0:
            log = get_log(prog) if prog is not None else ""
            nv.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"{what}: {nv.nvrtcGetErrorString(status).decode()}\n{log}")

    def get_log(prog):
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        nv.nvrtcGetProgramLog(prog, buf)
        return buf.value.decode(errors="replace")

    prog = ctypes.c_void_p()
    check(nv.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"first_order.cu", 0,
                                None, None), "nvrtcCreateProgram")
    try:
        for e in name_expressions:
            check(nv.nvrtcAddNameExpression(prog, e.encode()), f"nvrtcAddNameExpression {e}")
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        check(nv.nvrtcCompileProgram(prog, len(options), ctypes.cast(opts, c_char_pp)),
              "nvrtcCompileProgram", prog)
        lowered = {}
        for e in name_expressions:
            out = ctypes.c_char_p()
            check(nv.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(out)),
                  f"nvrtcGetLoweredName {e}")
            lowered[e] = out.value.decode()
        size = ctypes.c_size_t()
        check(nv.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        buf = ctypes.create_string_buffer(size.value)
        check(nv.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
        return buf.value.decode(), lowered, get_log(prog)
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))
