"""Scalar metrics to TensorBoard event files (tensorboardX; no TensorFlow needed) and, one JSON
line per write (`{"step": ..., **scalars}`, floats exact), to `metrics.jsonl` in the same folder.

Only process 0 writes; other processes get a writer that does nothing, so the
training loop calls it unconditionally.
"""
import json
import os
from typing import Mapping

import jax


class MetricsWriter:
  """Writes `{name: float}` scalars at a step under `logdir` (e.g. MODEL_DIR/train)."""

  def __init__(self, logdir: str):
    self._writer = None
    self._jsonl = os.path.join(logdir, "metrics.jsonl")
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # imported lazily: only the writer needs it

      os.makedirs(logdir, exist_ok=True)
      self._writer = SummaryWriter(logdir=logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=int(step))
    with open(self._jsonl, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
