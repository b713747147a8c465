"""Command line for training, t5x style: gin files + bindings in, the gin-configured `train()` run.

  python -m pixelllm_jax.train \\
    --gin_file=runs/demo.gin \\
    --gin.MODEL_DIR="'runs/x'" --gin.TRAIN_STEPS=100

Flags: pixelllm_jax/cli.py. Run files include `runs/train.gin`, which binds
`train`'s arguments. The operative config is written to MODEL_DIR/config.gin
after the first step.
"""
from typing import Sequence

import jax
from absl import logging

from pixelllm_jax import cli
from pixelllm_jax.train import trainer


def run(argv: Sequence[str]) -> trainer.TrainResult:
  """The entry after absl parsed flags: gin, then the gin-configured `train()`."""
  cli.start(argv, entry="train")
  from pixelllm_jax import configurables  # pylint: disable=import-outside-toplevel
  logging.info("Devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
               jax.process_count())
  record = cli.startup_record("train", "train_data.data")
  result = configurables.train(after_first_step=cli.write_operative_config, run_record=record,
                               allow_config_change=cli.FLAGS.allow_config_change)
  logging.info("Done: %s in %.1f s", result.metrics, result.train_seconds)
  return result


def cli_main() -> None:
  """Console-script entry (`pixelllm-train`)."""
  cli.run(run)
