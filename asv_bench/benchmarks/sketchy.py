"""asv: Sketchy's building blocks (one FD update, the O(dk) apply) and one step, float32.

The side-by-side comparison with Google's tearfree Sketchy in one process is
``asv_bench/scripts/peers_sketchy.py``; here each benchmark times arrayopt alone.
"""

from __future__ import annotations

import numpy as np

from .common import ao


class FDUpdate:
    """``fd_update`` of a d × k sketch with m new columns (m = 1: S-AdaGrad; m = d: a square weight)."""

    params = ([1024, 4096], [128, 256], [1, 1024])
    param_names = ["d", "k", "m"]
    timeout = 600
    number = 1
    repeat = 3

    def setup(self, d, k, m):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((d, m), dtype=np.float32)
        zeros = (np.zeros((d, k), np.float32), np.zeros(k, np.float32), np.zeros(1, np.float32))
        s = ao.linalg.fd_update(*zeros, rng.standard_normal((d, k + 1), dtype=np.float32))
        self.state = (s.eigvecs, s.sv, s.tail)
        self.x = x

    def time_fd_update(self, d, k, m):
        ao.linalg.fd_update(*self.state, self.x, beta2=0.999)


class LowrankApply:
    """``lowrank_apply``: ``(G̃ + ε)^(-1/4) V`` for a d × k sketch and V of c columns (two skinny GEMMs)."""

    params = ([1024, 4096], [128, 256], [1, 1024])
    param_names = ["d", "k", "c"]
    number = 3
    repeat = 5

    def setup(self, d, k, c):
        rng = np.random.default_rng(0)
        self.u = np.linalg.qr(rng.standard_normal((d, k)))[0].astype(np.float32)
        self.mu = np.sort(rng.random(k).astype(np.float32))[::-1].copy()
        self.tail = np.full(1, 0.01, np.float32)
        self.v = rng.standard_normal((d, c), dtype=np.float32)

    def time_lowrank_apply(self, d, k, c):
        ao.linalg.lowrank_apply(self.u, self.mu, self.tail, self.v, alpha=0.25, eps=1e-7, relative=True)


class SketchyStep:
    """One ``ao.sketchy`` step of a float32 weight, rank 128, sketches every F steps (a cycle of F steps)."""

    params = (["1024x1024", "4096x1024"], [1, 10])
    param_names = ["shape", "F"]
    timeout = 900
    number = 1
    repeat = 3

    def setup(self, shape, freq):
        rng = np.random.default_rng(0)
        shp = tuple(int(v) for v in shape.split("x"))
        self.opt = ao.sketchy(learning_rate=1e-3, rank=128, update_every=freq, merge_small_dims=1)
        self.p = rng.standard_normal(shp, dtype=np.float32)
        self.gs = [rng.standard_normal(shp, dtype=np.float32) * np.float32(1e-2) for _ in range(2)]
        self.state = self.opt.init(self.p)
        self.freq = freq

    def time_cycle(self, shape, freq):
        for i in range(self.freq):
            self.p, self.state = self.opt.step(self.p, self.gs[i % 2], self.state)

    def track_state_bytes(self, shape, freq):
        return ao.state_nbytes(self.state)

    track_state_bytes.unit = "bytes"
