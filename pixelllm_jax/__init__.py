"""pixelllm-jax: Pixel Aligned Language Models (PixelLLM) in JAX/Flax."""
