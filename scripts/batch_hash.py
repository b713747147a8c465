"""The SHA-256 of a run's first training batches: proof that a change left the data stream alone.

  .venv/bin/python scripts/batch_hash.py --gin_file=runs/demo.gin \\
      --gin.WORLD_DIR="'data/world'" [--num_batches=20]

Builds the run's gin-configured `train_data` (nothing is trained; MODEL_DIR need not be given) and
hashes every field of the first --num_batches batches (name, dtype, shape and bytes, fields in
name order). The same gin files and data give the same hash on any machine.
"""
import hashlib

import numpy as np
from absl import flags

from pixelllm_jax import cli

flags.DEFINE_integer("num_batches", 20, "How many batches to hash.")


def batch_hash(batches, num_batches: int) -> str:
  digest = hashlib.sha256()
  for _ in range(num_batches):
    batch = next(batches)
    for name in sorted(batch):
      array = np.ascontiguousarray(batch[name])
      for part in (name, str(array.dtype), str(array.shape)):
        digest.update(part.encode())
      digest.update(array.tobytes())
  return digest.hexdigest()


def main(argv):
  cli.start(argv)
  from pixelllm_jax import configurables  # pylint: disable=import-outside-toplevel
  batches = configurables.REGISTERED["train_data"][1]()
  print(f"{batch_hash(batches, flags.FLAGS.num_batches)}  first {flags.FLAGS.num_batches} batches")


if __name__ == "__main__":
  cli.run(main)
