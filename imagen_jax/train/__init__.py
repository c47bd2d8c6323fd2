"""imagen_jax.train."""
