"""`python -m pixelllm_jax.eval --gin_file=runs/demo.gin --gin.MODEL_DIR="'runs/demo'"`.

Same flags as training (pixelllm_jax/cli.py), plus which checkpoints (job.py):
  --mode=latest|step|all|follow   (default latest)
  --step=N                        with --mode=step
  --final_step=N                  follow: stop after this step (default: the training's
                                  train.num_steps, from MODEL_DIR/run_record.json)
  --timeout=SECONDS               follow: stop after this long without a new checkpoint
  --poll_seconds=SECONDS          follow: how often to look for one (default 10)
  --reevaluate                    evaluate steps whose eval/<step>/metrics.json is complete
Runs the gin-configured `evaluator.evaluate()` (bound by `runs/eval.gin`).
"""
from typing import Sequence

from absl import app, flags

from pixelllm_jax import cli

flags.DEFINE_enum("mode", "latest", ["latest", "step", "all", "follow"],
                  "Which checkpoints: the latest, --step, all, or follow a training run.")
flags.DEFINE_integer("step", None, "With --mode=step: the checkpoint step to evaluate.")
flags.DEFINE_integer("final_step", None, "Follow: stop once this step is evaluated (default: "
                     "the training's num_steps).")
flags.DEFINE_float("timeout", None, "Follow: stop after this many seconds without a new "
                   "checkpoint (default: wait until the final step).")
flags.DEFINE_float("poll_seconds", 10.0, "Follow: seconds between looks for a new checkpoint.")
flags.DEFINE_bool("reevaluate", False, "Evaluate steps again although their "
                  "eval/<step>/metrics.json is complete.")


def main(argv: Sequence[str]):
  from pixelllm_jax.eval import job  # pylint: disable=import-outside-toplevel
  f = cli.FLAGS
  try:
    selection = job.Selection(mode=f.mode, step=f.step, final_step=f.final_step,
                              timeout_seconds=f.timeout, poll_seconds=f.poll_seconds,
                              reevaluate=f.reevaluate)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  cli.start(argv, entry="evaluate")
  from pixelllm_jax import configurables, gin_checks  # pylint: disable=import-outside-toplevel
  record = cli.startup_record("evaluate", "evaluate.data")
  model_record = {k: record[k] for k in gin_checks.model_keys(record)}
  return configurables.evaluate(run_record=model_record, selection=selection,
                                allow_config_change=f.allow_config_change)


def run() -> None:
  """Console-script entry (`pixelllm-eval`)."""
  cli.run(main)


if __name__ == "__main__":
  run()
