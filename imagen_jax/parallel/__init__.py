"""imagen_jax.parallel."""
