"""The CUDA backend's op table and module loader (``backends/cupy_cuda/``), without a GPU.

The table is collected from the op modules (``OPS``, ``run``; ``backends/_optable.py``), each of
which loads one ``.cu`` file through ``_loader``; the loader compiles a file once per process and
device, also when threads ask at once (on a fake ``cupy``: nothing is launched here).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from arrayopt.backends import cupy_cuda
from arrayopt.backends.cupy_cuda import _loader, first_order

try:
    from . import _cuda_host_harness as hh
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import _cuda_host_harness as hh

# the op table: op -> OpEntry(module, capabilities); every op module's kernels are one KernelFile
TABLE = cupy_cuda.CupyCUDA.table
KERNEL_FILES = {entry.module.KERNELS.path: entry.module.KERNELS for entry in TABLE.values()}


def test_op_table_comes_from_the_op_modules():
    """``ops`` and ``capabilities`` are the ``OPS`` of the package's op modules, each op with the
    module whose ``run`` fuses it; every public module of the package is an op module."""
    import importlib
    import pkgutil

    b = cupy_cuda.BACKEND
    public = {i.name for i in pkgutil.iter_modules(cupy_cuda.__path__) if not i.name.startswith("_")}
    declaring = {name for name in public
                 if hasattr(importlib.import_module(f"{cupy_cuda.__name__}.{name}"), "OPS")}
    assert {entry.module.__name__.rsplit(".", 1)[1] for entry in TABLE.values()} == declaring == public
    assert set(b.capabilities) == set(b.ops) == {op for name in public for op in
                                                  importlib.import_module(f"{cupy_cuda.__name__}.{name}").OPS}
    for op, entry in TABLE.items():
        assert dict(entry.capabilities) == entry.module.OPS[op]
        assert b.capabilities[op] is entry.capabilities and callable(entry.module.run)
    with pytest.raises(ValueError, match="no kernel for op 'nope'"):
        b.run("nope", [], [], [], ())


def test_every_cu_file_is_loaded_by_one_op_module():
    """Each ``.cu`` of the backend is the ``KERNELS`` of an op module in the table (none is
    orphaned), and the files exist."""
    assert sorted(KERNEL_FILES) == hh.cu_files()
    assert all(path.is_file() and path.parent == hh.CU_DIR for path in KERNEL_FILES)


def test_launch_shape():
    assert _loader.launch_shape(1, 100) == ((1,), (_loader.BLOCK,))
    assert _loader.launch_shape(_loader.BLOCK + 1, 100) == ((2,), (_loader.BLOCK,))
    assert _loader.launch_shape(10**10, 100) == ((100,), (_loader.BLOCK,))


# ---------------------------------------------------------------- emulated device (fake cupy)


@pytest.fixture
def emulated(monkeypatch):
    """A fresh backend whose ``cupy`` is the fake one of ``_cuda_host_harness`` (no kernel runs)."""
    monkeypatch.setitem(sys.modules, "cupy", hh.fake_cupy(harness=None))
    hh.fresh_loader(monkeypatch)
    return cupy_cuda.CupyCUDA()


def test_emulated_available_and_module(emulated):
    backend = emulated
    assert backend.available() is True and "CuPy arrays" in backend.reason()
    for kernels in KERNEL_FILES.values():
        mod = kernels.module()
        assert mod.code == _loader.source_text(kernels.path)
        assert mod.options == _loader.COMPILE_OPTIONS and "-fmad=false" in mod.options
        assert mod.name_expressions == kernels.name_expressions
    assert _loader.max_blocks(0) == 64


def test_emulated_loader_compiles_each_file_once_across_threads(emulated, monkeypatch):
    """One ``RawModule`` per ``.cu`` file and one handle per kernel, dtype and device, however
    many threads ask at once (compiling is slow: a race would build twice); a kernel the file
    does not define is refused by name."""
    import threading
    import time

    cp = sys.modules["cupy"]
    made = []

    class CountingModule(cp.RawModule):
        def __init__(self, **kw):
            made.append(kw["code"])
            time.sleep(0.02)
            super().__init__(**kw)

        def get_function(self, name):
            time.sleep(0.005)
            return super().get_function(name)

    monkeypatch.setattr(cp, "RawModule", CountingModule)
    barrier = threading.Barrier(8)
    got = []

    def worker():
        barrier.wait()
        got.append([kernels.function(kernels.bases[0], np.float32, 0) for kernels in KERNEL_FILES.values()])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == len(KERNEL_FILES)  # each file compiled once
    assert all(all(a is b for a, b in zip(row, got[0])) for row in got)
    with pytest.raises(ValueError, match="first_order.cu has no kernel 'eva_apply'"):
        first_order.KERNELS.function("eva_apply", np.float32, 0)
