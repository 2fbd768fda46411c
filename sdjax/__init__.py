"""sdjax: Stable Diffusion inference in JAX/Flax with Pallas GPU kernels."""

__version__ = "0.1.0"
