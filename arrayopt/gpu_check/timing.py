"""Interleaved timing: each round runs every contender once, medians over rounds.

A contender is a callable that performs one step. One sample is ``steps`` back-to-back
calls between two device synchronisations, divided by ``steps`` (launch overhead is part
of a step, as in a training loop). Interleaving the contenders round by round keeps a
slow phase of a shared machine from landing on one of them.
"""

from __future__ import annotations

import statistics
import time


def interleaved_ms(contenders: dict, sync, *, rounds: int, steps: int, warmup: int = 1) -> dict:
    """``{name: median ms per step}`` for ``contenders`` (``{name: fn}``)."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) * 1e3 / steps)
    return {name: statistics.median(v) for name, v in samples.items()}
