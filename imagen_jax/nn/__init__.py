"""imagen_jax.nn."""
