"""CuPy CUDA backend (placeholder until the kernels land): never available."""

from __future__ import annotations


class CupyCUDA:
    name = "cupy_cuda"
    ops = frozenset()

    def available(self) -> bool:
        return False

    def reason(self) -> str:
        return "not built yet"

    def accepts(self, ns, *groups) -> bool:
        return False


BACKEND = CupyCUDA()
