"""Sketchy: Frequent-Directions S-AdaGrad and S-Shampoo (math, choices and oracles: ``docs/sketchy.md``)."""

from __future__ import annotations

from .config import SketchyConfig
from .optimizer import Sketchy, sketchy

__all__ = ["Sketchy", "SketchyConfig", "sketchy"]
