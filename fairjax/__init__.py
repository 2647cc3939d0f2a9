"""fairjax: population-level fairness fine-tuning of text-to-image models in JAX/Flax."""

__version__ = "0.1.0"
