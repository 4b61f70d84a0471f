"""optax adapters (re-exports): ``transform(opt)``, any arrayopt optimizer as an ``optax.GradientTransformation``."""

from ._optax_transform import TransformState, transform

__all__ = ["TransformState", "transform"]
