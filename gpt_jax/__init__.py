"""gpt-jax: GPT training in JAX/Flax, in the spirit of nanoGPT."""

__version__ = "0.1.0"
