"""`python -m pixelllm_jax.eval --gin_file=runs/demo.gin --gin.MODEL_DIR="'runs/demo'"`.

Same flags as training (pixelllm_jax/cli.py); runs the gin-configured
`evaluator.evaluate()` (bound by `runs/eval.gin`).
"""
from typing import Any, Sequence

from pixelllm_jax import cli


def main(argv: Sequence[str]) -> dict[str, Any]:
  cli.start(argv)
  from pixelllm_jax import configurables  # pylint: disable=import-outside-toplevel
  return configurables.evaluate()


def run() -> None:
  """Console-script entry (`pixelllm-eval`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
