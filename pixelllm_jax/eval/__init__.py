"""Offline evaluation: `python -m pixelllm_jax.eval` (see evaluator.py)."""
