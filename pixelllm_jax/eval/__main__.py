"""`python -m pixelllm_jax.eval --gin_file=runs/demo.gin --gin.MODEL_DIR="'runs/demo'"`.

Same flags as training (gin files, bindings, `--gin.NAME=VALUE`); runs the
gin-configured `evaluator.evaluate()`.
"""
from typing import Sequence

from absl import app, logging

from pixelllm_jax.eval import evaluator
from pixelllm_jax.train import main as train_main


def _main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  flags = train_main.FLAGS
  if not flags["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  train_main.parse_gin(flags.gin_file, flags.gin_bindings, flags.gin_search_paths)
  evaluator.evaluate()


def run() -> None:
  app.run(_main, flags_parser=train_main.parse_flags)


if __name__ == "__main__":
  run()
