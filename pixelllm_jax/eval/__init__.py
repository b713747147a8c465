"""Offline evaluation: `python -m pixelllm_jax.eval` (evaluator.py: what is evaluated;
job.py: which checkpoints, following a training run; outputs.py: what is written)."""
