"""imagen_jax.cli."""
