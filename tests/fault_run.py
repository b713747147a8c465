"""A toy training run in its own process, for the fault tests (tests/test_faults.py).

  python tests/fault_run.py MODEL_DIR NUM_STEPS CHECKPOINT_EVERY

Trains the toy model of test_train_step.py with `trainer.train` (log_every=1, so every step's
loss lands in MODEL_DIR/train/metrics.jsonl), prints a progress line per step, and at the end
writes the final parameters to MODEL_DIR/final_params.npz and 'done preempted=<bool>'.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from pixelllm_jax.train import trainer  # noqa: E402
from test_train_step import ToyIterator, ToyModel, partitioner_of, toy_optimizer  # noqa: E402


def main(model_dir: str, num_steps: int, checkpoint_every: int) -> None:
  result = trainer.train(
      model_dir=model_dir, model=ToyModel(frozen=("sam",)), train_data=ToyIterator(seed=11),
      num_steps=num_steps, optimizer=toy_optimizer(total_steps=num_steps),
      partitioner=partitioner_of(2, 1), seed=5, log_every=1, checkpoint_every=checkpoint_every,
      keep_checkpoints=2)
  flat = traverse_util.flatten_dict(jax.device_get(result.state.params), sep="/")
  np.savez(os.path.join(model_dir, "final_params.npz"), **flat)
  print(f"done preempted={result.preempted} step={int(result.state.step)}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
