"""What keeps a training run from losing work or going on silently when something is wrong.

- `ModelDirLock`: one trainer per model dir. An exclusive `fcntl` lock on
  `MODEL_DIR/train.lock` held by process 0 for the whole run; a second trainer
  gets a message naming the holder (pid, host, start time). Local paths only:
  for URLs (gs://) the lock is skipped.
- `PreemptionNotice`: SIGTERM (what TPU / GPU schedulers send before taking the
  machine) sets a flag instead of killing the process; the loop then saves a
  checkpoint and returns. Installed only in the main thread of a
  single-process run; multi-process runs use jax's preemption sync point,
  which the coordination service raises on every process at the same step.
- `NonFiniteGuard`: the train step keeps the previous parameters and optimizer
  state when the loss or any gradient is not finite and reports it; the guard
  counts such steps (one step behind, so the host never waits for the device)
  and stops the run after `max_in_a_row` consecutive ones.
- `SaveMonitor`: Orbax finishes asynchronous saves in a background thread and
  only logs a failure there; the monitor checks that every save it started was
  finalized as soon as the save is no longer in progress, and stops the run
  with the failure instead of going on until the next save.
"""
import datetime
import fcntl
import os
import signal
import socket
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


class ModelDirBusy(RuntimeError):
  """Another training run holds the model dir."""


class TrainingDiverged(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class CheckpointSaveFailed(RuntimeError):
  """An asynchronous checkpoint save did not complete."""


class ModelDirLock:
  """Exclusive lock of `model_dir/train.lock` (process 0, local paths)."""

  def __init__(self, model_dir: str):
    self.path = os.path.join(model_dir, "train.lock")
    self._file = None
    self._active = jax.process_index() == 0 and "://" not in model_dir

  def __enter__(self) -> "ModelDirLock":
    if not self._active:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    handle = open(self.path, "a+")
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "unknown process"
      handle.close()
      raise ModelDirBusy(
          f"{os.path.dirname(self.path)} is in use by another training run ({holder}); "
          "wait for it to finish, stop it, or give another MODEL_DIR") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
    handle.flush()
    self._file = handle
    return self

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


class PreemptionNotice:
  """Turns SIGTERM into a request to save and stop (see the module docstring)."""

  def __init__(self):
    self._requested = False
    self._previous: Any = None
    self._installed = False

  def __enter__(self) -> "PreemptionNotice":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._requested = True

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process)."""
    if jax.process_count() > 1:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._requested


class NonFiniteGuard:
  """Counts steps the train step skipped for a non-finite loss or gradient."""

  def __init__(self, max_in_a_row: int):
    if max_in_a_row < 1:
      raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_in_a_row}")
    self.max_in_a_row = max_in_a_row
    self.total = self.in_a_row = 0
    self._pending: tuple[int, Any] | None = None

  def add(self, step: int, flag: Any) -> None:
    """Records step `step`'s flag (a device scalar) and checks the previous step's."""
    previous, self._pending = self._pending, (step, flag)
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._check(*pending)

  def _check(self, step: int, flag: Any) -> None:
    if not float(np.asarray(flag)):
      self.in_a_row = 0
      return
    self.total += 1
    self.in_a_row += 1
    print(f"step {step}: non-finite loss or gradient, update skipped "
          f"({self.in_a_row} in a row, {self.total} in this run)", flush=True)
    if self.in_a_row >= self.max_in_a_row:
      raise TrainingDiverged(
          f"training diverged: {self.in_a_row} consecutive steps (up to step {step}) had a "
          "non-finite loss or gradient, so their updates were skipped; the parameters are "
          "those of the last finite step and no non-finite state was checkpointed")


class SaveMonitor:
  """Confirms each asynchronous save once it is no longer in progress."""

  def __init__(self, manager: Any):
    self.manager = manager
    self.pending: int | None = None

  def started(self, step: int) -> None:
    self.pending = step

  def check(self, *, wait: bool = False) -> None:
    if self.pending is None:
      return
    step = self.pending
    if wait:
      try:  # Orbax re-raises a background failure here, or only logs it
        self.manager.wait_until_finished()
      except Exception as error:  # pylint: disable=broad-except
        self.pending = None
        raise CheckpointSaveFailed(self._message(step, f"{type(error).__name__}: {error}")) \
            from error
    elif self.manager.is_saving_in_progress():
      return
    self.pending = None
    self.manager.reload()
    if step not in self.manager.all_steps():
      raise CheckpointSaveFailed(self._message(step, "the error is logged above"))

  def _message(self, step: int, cause: str) -> str:
    return (f"saving the checkpoint of step {step} under {self.manager.directory} failed "
            f"({cause}; e.g. a full disk); stopping now rather than training on without "
            "checkpoints")
