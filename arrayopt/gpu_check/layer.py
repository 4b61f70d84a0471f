"""The device layer of the GPU check: arrays, synchronisation and versions of one device.

:class:`CupyLayer` is the real one (CuPy arrays, torch CUDA tensors). :class:`HostLayer`
runs the same code paths on NumPy arrays and torch CPU tensors, so the command's own code
is exercised on machines without a GPU (its figures mean nothing there and say so).
"""

from __future__ import annotations

import importlib.util
import platform

import numpy as np


def _version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return getattr(__import__(name), "__version__", "unknown")
    except Exception as e:  # a broken install is reported, not raised
        return f"does not import ({type(e).__name__})"


def _torch_or_none():
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


class CupyLayer:
    """One CUDA device through CuPy (and torch, where its CUDA build sees the device)."""

    fake = False
    array_name = "CuPy"

    def __init__(self):
        import cupy

        self.cp = cupy
        self.xp = cupy
        torch = _torch_or_none()
        self.torch = torch if torch is not None and torch.cuda.is_available() else None
        self.torch_device = "cuda"

    @staticmethod
    def probe() -> tuple:
        """``(ok, reason)``: CuPy imports and sees a CUDA device."""
        from ..backends import cupy_cuda

        backend = cupy_cuda.BACKEND
        return (True, "") if backend.available() else (False, backend.reason())

    def sync(self) -> None:
        self.cp.cuda.Device().synchronize()
        if self.torch is not None:
            self.torch.cuda.synchronize()

    def randn(self, shape, seed: int):
        rng = self.cp.random.default_rng(seed)
        return rng.standard_normal(shape, dtype=self.cp.float32)

    def to_torch(self, a):
        return self.torch.from_dlpack(a)

    def to_host(self, a) -> np.ndarray:
        return self.cp.asnumpy(a)

    def free_bytes(self) -> int:
        self.free_pools()
        free, _total = self.cp.cuda.runtime.memGetInfo()
        return int(free)

    def free_pools(self) -> None:
        self.cp.get_default_memory_pool().free_all_blocks()
        if self.torch is not None:
            self.torch.cuda.empty_cache()

    def info(self) -> dict:
        rt = self.cp.cuda.runtime
        props = rt.getDeviceProperties(self.cp.cuda.Device().id)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        _free, total = rt.memGetInfo()
        info = {
            "device": name,
            "compute_capability": f"{props['major']}.{props['minor']}",
            "multiprocessors": int(props["multiProcessorCount"]),
            "memory_gib": round(total / 2**30, 1),
            "driver": _cuda_version(rt.driverGetVersion()),
            "cuda_runtime": _cuda_version(rt.runtimeGetVersion()),
            "nvidia_driver": _nvidia_driver(),
        }
        info.update(_library_versions())
        if self.torch is not None:
            info["torch_cuda"] = self.torch.version.cuda
        return info


class HostLayer:
    """NumPy arrays and torch CPU tensors standing in for a device (tests of the command)."""

    fake = True
    array_name = "NumPy"

    def __init__(self):
        self.xp = np
        self.torch = _torch_or_none()
        self.torch_device = "cpu"

    @staticmethod
    def probe() -> tuple:
        return True, ""

    def sync(self) -> None:
        pass

    def randn(self, shape, seed: int):
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    def to_torch(self, a):
        return self.torch.from_numpy(a)

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a)

    def free_bytes(self) -> int:
        return 2**30

    def free_pools(self) -> None:
        pass

    def info(self) -> dict:
        info = {"device": f"host stand-in ({platform.processor() or platform.machine()}), "
                          "not a GPU: figures are meaningless"}
        info.update(_library_versions())
        return info


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return None
    parts = [p for p in first.split() if p[:1].isdigit() and "." in p]
    return parts[0] if parts else first.strip()


def _library_versions() -> dict:
    from .. import __version__

    return {"arrayopt": __version__, "python": platform.python_version(),
            "numpy": np.__version__, "cupy": _version("cupy"), "torch": _version("torch"),
            "numba": _version("numba")}
