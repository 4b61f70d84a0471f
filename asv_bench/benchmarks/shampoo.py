"""asv: Shampoo step time (1024², 4096x1024 blocked at 1024; roots every F steps; async) and state bytes.

The side-by-side comparison with the peers (pytorch_optimizer Shampoo, heavyball SOAP) in one process
is ``asv_bench/scripts/peers_shampoo.py``; here each benchmark times arrayopt alone. ``time_cycle`` runs
one whole cycle of F steps (one root step + F-1 plain steps), so time/F is the amortized step.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .common import ao

SHAPES = {"1024x1024": (1024, 1024), "4096x1024": (4096, 1024)}


def _opt(freq, root_dtype="float64", executor=None):
    return ao.shampoo(learning_rate=1e-3, block_size=1024, b1=0.0, b2=1.0, eps=1e-6, graft="none",
                      precondition_every=freq, root_dtype=root_dtype, executor=executor,
                      root_delay=(freq if executor is not None else None))


class ShampooCycle:
    params = (["1024x1024", "4096x1024"], [1, 10], ["float64", "float32", "async"])
    param_names = ["shape", "F", "roots"]
    timeout = 600
    number = 1
    repeat = 3

    def setup(self, shape, freq, roots):
        rng = np.random.default_rng(0)
        shp = SHAPES[shape]
        self.pool = ThreadPoolExecutor(1) if roots == "async" else None
        if roots == "async" and freq == 1:
            raise NotImplementedError  # async needs F > 1 to overlap
        self.opt = _opt(freq, "float64" if roots == "async" else roots, self.pool)
        self.p = rng.standard_normal(shp, dtype=np.float32)
        self.gs = [rng.standard_normal(shp, dtype=np.float32) * np.float32(1e-2) for _ in range(2)]
        self.s = self.opt.init(self.p)
        self.freq = freq
        for i in range(freq + 1):
            self.p, self.s = self.opt.step(self.p, self.gs[i % 2], self.s)

    def teardown(self, shape, freq, roots):
        if self.pool is not None:
            self.pool.shutdown()

    def time_cycle(self, shape, freq, roots):
        for i in range(self.freq):
            self.p, self.s = self.opt.step(self.p, self.gs[i % 2], self.s)

    def track_state_bytes(self, shape, freq, roots):
        return ao.state_nbytes(self.s)

    track_state_bytes.unit = "bytes"
