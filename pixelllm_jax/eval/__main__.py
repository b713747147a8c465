"""`python -m pixelllm_jax.eval --gin_file=runs/demo.gin --gin.MODEL_DIR="'runs/demo'"`.

Same flags as training (pixelllm_jax/cli.py); runs the gin-configured
`evaluator.evaluate()` (bound by `runs/eval.gin`).
"""
from typing import Any, Sequence

from pixelllm_jax import cli


def main(argv: Sequence[str]) -> dict[str, Any]:
  cli.start(argv, entry="evaluate")
  from pixelllm_jax import configurables, gin_checks  # pylint: disable=import-outside-toplevel
  record = cli.startup_record("evaluate", "evaluate.data")
  model_record = {k: record[k] for k in gin_checks.model_keys(record)}
  return configurables.evaluate(run_record=model_record,
                                allow_config_change=cli.FLAGS.allow_config_change)


def run() -> None:
  """Console-script entry (`pixelllm-eval`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
