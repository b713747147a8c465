"""Scalar metrics to TensorBoard event files (tensorboardX; no TensorFlow needed).

Only process 0 writes; other processes get a writer that does nothing, so the
training loop calls it unconditionally.
"""
import os
from typing import Mapping

import jax


class MetricsWriter:
  """Writes `{name: float}` scalars at a step under `logdir` (e.g. MODEL_DIR/train)."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # imported lazily: only the writer needs it

      os.makedirs(logdir, exist_ok=True)
      self._writer = SummaryWriter(logdir=logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=int(step))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
