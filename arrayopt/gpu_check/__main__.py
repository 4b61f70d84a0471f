"""``python -m arrayopt.gpu_check``: see :mod:`arrayopt.gpu_check`."""

from __future__ import annotations

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
