"""imagen_jax.eval."""
