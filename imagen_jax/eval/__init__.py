"""imagen_jax.eval: evaluations of samples (ShapesBench; see docs/shapes.md)."""
