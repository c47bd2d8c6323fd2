"""imagen_jax.eval: evaluations of samples: ShapesBench (docs/shapes.md), FID
(docs/eval.md)."""
