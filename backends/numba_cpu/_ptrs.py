"""Many small leaves in one kernel call: leaves passed as a table of data addresses.

A Numba call costs a few microseconds (its arguments are typed and unboxed one by one), and a
torch tensor's NumPy view another microsecond; a tree of many small leaves (biases, norms)
would pay both per leaf. As torch's ``foreach``/fused optimizers do, the small torch leaves of
a step go to one call instead: ``addrs[j, k]`` is the data address of array ``k`` (param,
grad, state arrays) of leaf ``j``, ``sizes[j]`` its number of elements, read as flat vectors
over their storage (``tensor.data_ptr()``, valid for the dense layouts the backend accepts).
Inside the kernel :func:`vector` makes each address a flat array again.

``like``: a scalar of the arrays' dtype (the pointee type); one table holds one dtype.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.extending import intrinsic

from ._common import REDUCE, SERIAL

__all__ = ["vector", "sum_addrs", "squares_below_addrs", "count_nonfinite_addrs", "address_table", "NUMPY_DTYPE"]

#: ``str(torch dtype)`` -> the NumPy dtype of the tables (the backend takes float32 and float64 only)
NUMPY_DTYPE = {"torch.float32": np.dtype(np.float32), "torch.float64": np.dtype(np.float64)}


@intrinsic
def _pointer(typingctx, addr, like):
    """The address ``addr`` (int64) as a pointer to ``like``'s type."""
    ptr = types.CPointer(like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(types.int64, like), codegen


@njit(**SERIAL)
def vector(addr, n, like):
    """The ``n`` elements at ``addr`` as a flat array of ``like``'s dtype (no copy)."""
    return carray(_pointer(addr, like), n)


@njit(**REDUCE)
def sum_addrs(addrs, sizes, like):
    """``Σ`` of every entry of every vector of the table (``addrs``: one column), in float64 from
    per-vector sums in ``like``'s dtype: finite only if every entry is."""
    total = 0.0
    for j in range(sizes.size):
        x = vector(addrs[j], sizes[j], like)
        s = like - like
        for i in range(x.size):
            s += x[i]
        total += s
    return total


@njit(**REDUCE)
def squares_below_addrs(addrs, sizes, like, bound):
    """Whether every vector of the table has ``Σ x_i² < bound`` (in ``like``'s dtype: false on
    NaN/Inf and on overflow), as ``arrayopt._overflow.gradients_in_range`` asks of each leaf."""
    for j in range(sizes.size):
        x = vector(addrs[j], sizes[j], like)
        s = like - like
        for i in range(x.size):
            s += x[i] * x[i]
        if not s < bound:
            return False
    return True


@njit(**SERIAL)
def count_nonfinite_addrs(addrs, sizes, like):
    """Number of NaN/Inf entries over every vector of the table (``addrs``: one column)."""
    bad = 0
    for j in range(sizes.size):
        x = vector(addrs[j], sizes[j], like)
        for i in range(x.size):
            if x[i] - x[i] != 0:
                bad += 1
    return bad


def address_table(rows) -> tuple:
    """``(addrs, sizes)`` int64 arrays from ``rows = [(size, addr0, addr1, ...)]``."""
    t = np.array(rows, dtype=np.int64).reshape(len(rows), -1)
    return np.ascontiguousarray(t[:, 1:]), np.ascontiguousarray(t[:, 0])
