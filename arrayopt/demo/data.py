"""The data set: scikit-learn's bundled 8x8 digits images (no network needed).

``load_digits`` ships 1 797 grey-scale 8x8 images with pixel values 0..16. We
flatten them to 64 features, scale them to [0, 1] (divide by 16) and split them
into a training and a test set with a permutation fixed by ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Digits", "load"]


@dataclass(frozen=True)
class Digits:
    """Train/test images, shape ``(n, 64)``, values in [0, 1]."""

    train: np.ndarray
    test: np.ndarray

    @property
    def n_features(self) -> int:
        return self.train.shape[1]


def load(seed: int = 0, test_fraction: float = 0.2, dtype=np.float32) -> Digits:
    """Load the digits, scale to [0, 1] and split them (the split depends only on ``seed``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo needs scikit-learn: pip install 'arrayopt[demo]'") from e
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction!r}")
    x = load_digits().data.astype(np.float64) / 16.0
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    return Digits(train=np.ascontiguousarray(x[train], dtype=dtype),
                  test=np.ascontiguousarray(x[test], dtype=dtype))
