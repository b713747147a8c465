"""`python -m pixelllm_jax.train --gin_file=... --gin.MODEL_DIR="'runs/x'"` (see main.py)."""
from pixelllm_jax.train import main

if __name__ == "__main__":
  main.cli_main()
