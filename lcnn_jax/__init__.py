"""lcnn_jax: smoothness, curvature, Lipschitz and sharpness of neural networks in JAX/Flax."""

__version__ = "0.1.0"
