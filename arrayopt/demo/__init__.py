"""The main job: compare arrayopt optimizers on a real model.

``python -m arrayopt.demo`` (or the ``arrayopt-demo`` console script) trains an
MLP autoencoder, the SONew paper's MNIST autoencoder scaled to scikit-learn's
8x8 digits (64-256-128-64-16-64-128-256-64, tanh hidden units, linear code
layer, sigmoid cross-entropy loss summed over pixels), with every optimizer in
:func:`arrayopt.registry.registered` from the same initial params and batch
order, and writes a results table and a loss plot.

Modules, one job each:

- :mod:`~arrayopt.demo.data`: load, scale and split the digits;
- :mod:`~arrayopt.demo.mnist`: MNIST from a user path, the cache, openml.org or a checked PyPI wheel
  (``--task mnist-autoencoder``, the SONew paper's 784-1000-500-250-30-250-500-1000-784 benchmark);
- :mod:`~arrayopt.demo.schedule`: the paper's per-epoch warm-up and decay of the learning rate;
- :mod:`~arrayopt.demo.model`: the autoencoder's forward and hand-written backward pass in NumPy;
- :mod:`~arrayopt.demo.train`: the training loop with timings;
- :mod:`~arrayopt.demo.report`: the table (text, Markdown, JSON) and the PNG;
- :mod:`~arrayopt.demo.cli`: the command line (``main(argv=None)``).

Needs the ``demo`` extra: ``pip install 'arrayopt[demo]'`` (scikit-learn, matplotlib, tqdm).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv=None) -> int:
    """Run the demo; ``argv`` as for the command line (default ``sys.argv[1:]``)."""
    from .cli import main as _main

    return _main(argv)
