"""Sketchy: Frequent-Directions S-AdaGrad and S-Shampoo (see ``README.md`` in this folder)."""

from __future__ import annotations

from .config import SketchyConfig
from .optimizer import Sketchy, sketchy

__all__ = ["Sketchy", "SketchyConfig", "sketchy"]
