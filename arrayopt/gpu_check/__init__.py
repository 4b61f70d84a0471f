"""``python -m arrayopt.gpu_check --out DIR``: prove and measure every CUDA path on one GPU.

On a machine with a CUDA device and CuPy (``pip install ".[gpu-check]"``) it

1. runs the GPU-marked tests (``pytest -m gpu``: CuPy arrays and torch CUDA tensors, parity
   with the reference path, bad inputs, save/load of device state);
2. times, in one process with the contenders interleaved (medians of per-step times over
   back-to-back steps, the device synchronised before and after each run of steps):

   - a device-to-device copy, which sets the memory-bandwidth floor of the run
     (bandwidth ``B = 8 n / t_copy`` bytes/s; Adam streams 28 B/param, so its floor is
     ``28 n / B``);
   - our Adam step on CuPy arrays and on torch CUDA tensors against
     ``torch.optim.Adam(fused=True)`` on the same tensors;
   - SONew diagonal, tridiagonal and band-4 (Adam graft) against our Adam;
   - Shampoo's step with roots every 1 and 10 steps (roots on the host, as Shampoo
     computes them), and one ``1024 x 1024`` factor's inverse 4th root on the device
     (coupled Newton, ``ao.linalg.inverse_pth_root``) against the host's ``eigh`` root;

   at 1M, 10M and 100M float32 parameters where the device's free memory allows;
3. writes ``gpu_check.json`` and ``gpu_check.md`` to ``DIR`` (device, driver and library
   versions included) and prints the table.

Without a device it prints why and exits with status 2 at once. Exit status 1 means a GPU
test failed or a measurement raised. ``--quick`` measures 1M and 10M only, with fewer
rounds (under two minutes on an H100); the full run stays under six.
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
