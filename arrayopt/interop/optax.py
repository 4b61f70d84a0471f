"""optax adapters (re-exports): ``transform(opt)``, any arrayopt optimizer as an
``optax.GradientTransformationExtraArgs`` (traced into the jitted step where the optimizer and
every part of a chain trace, else on the host; Eva's statistics as ``update(..., stats=...)``)."""

from ._optax_transform import TransformState, needs_stats, transform

__all__ = ["TransformState", "needs_stats", "transform"]
