"""One process of a multi-process toy training (tests/test_multiprocess.py).

  python tests/mp_worker.py PROCESS_ID NUM_PROCESSES PORT MODEL_DIR NUM_STEPS

Each process reads its share of the global batch (the same global toy batches whatever the
process count), trains the toy model of test_train_step.py on a data-parallel mesh over all
processes' devices, and process 0 writes the final parameters to MODEL_DIR/final_params.npz.
With NUM_PROCESSES 1 it runs alone, without jax.distributed.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

GLOBAL_BATCH = 8


def main(process_id: int, num_processes: int, port: int, model_dir: str, num_steps: int) -> None:
  if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=10)
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from pixelllm_jax.partitioning import Partitioner  # pylint: disable=import-outside-toplevel
  from pixelllm_jax.train import trainer  # pylint: disable=import-outside-toplevel
  from test_train_step import ToyIterator, ToyModel, toy_optimizer  # pylint: disable=import-outside-toplevel

  class Share(ToyIterator):
    """This process's rows of the global toy batch."""

    def __next__(self):
      batch = super().__next__()
      rows = GLOBAL_BATCH // jax.process_count()
      return jax.tree.map(lambda x: x[process_id * rows:(process_id + 1) * rows], batch)

  print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} "
        f"local devices, {jax.device_count()} in all", flush=True)
  result = trainer.train(model_dir=model_dir, model=ToyModel(), train_data=Share(seed=3),
                         num_steps=num_steps, optimizer=toy_optimizer(total_steps=max(num_steps, 3)),
                         partitioner=Partitioner((-1, 1, 1)), log_every=1,
                         checkpoint_every=max(num_steps // 2, 1))
  if jax.process_index() == 0:
    params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), result.state.params)
    np.savez(os.path.join(model_dir, "final_params.npz"),
             **traverse_util.flatten_dict(params, sep="/"))
  print(f"done {process_id}", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
