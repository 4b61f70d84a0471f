"""Eva: Kronecker-vector preconditioning with Sherman–Morrison inverses, and its variants
Eva-f (FOOF, layer inputs only) and Eva-s (vectorized Shampoo).

- :mod:`.optimizer`: :func:`eva` and :class:`Eva`;
- :mod:`.step`: :class:`EvaStep`, the frozen step description a backend reads;
- :mod:`.math`: the array-API math (Kronecker vectors, the three preconditioners, KL
  step-size control; re-exported as ``arrayopt.linalg.*``).
"""

from __future__ import annotations

from .optimizer import VARIANTS, Eva, eva
from .step import EvaStep

__all__ = ["eva", "Eva", "EvaStep", "VARIANTS"]
