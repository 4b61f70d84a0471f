"""CPU threads: limit BLAS/OpenMP pools and Numba's parallel kernels for the run.

The demo's model is small (about 118 000 params, batches of 32 images). For
arrays this size, extra threads do not pay: BLAS and OpenMP worker threads spin
between calls and take the cores the main thread needs, which made whole
training steps up to ten times slower on a 2-core machine. :func:`limit` caps
them (``--threads``, default 1) for the duration of a block and restores the
previous settings afterwards.
"""

from __future__ import annotations

import contextlib
import sys

__all__ = ["limit"]


@contextlib.contextmanager
def limit(n: int | None):
    """Use at most ``n`` threads in BLAS, OpenMP and Numba inside the block (None: leave as is)."""
    if n is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # scikit-learn depends on it, so this is rare
            pass
        else:
            stack.enter_context(threadpool_limits(limits=n))
        numba = sys.modules.get("numba")
        if numba is None:
            try:
                import numba
            except ImportError:
                numba = None
        if numba is not None:
            old = numba.get_num_threads()
            numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
            stack.callback(numba.set_num_threads, old)
        yield
