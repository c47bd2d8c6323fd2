"""imagen_jax.sample."""
