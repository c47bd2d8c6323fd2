"""imagen-jax: Imagen-style cascaded text-to-image diffusion (Saharia et al. 2022) in JAX."""

__version__ = "0.1.0"
