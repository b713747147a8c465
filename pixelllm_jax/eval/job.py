"""The evaluation job: which checkpoints to evaluate, waiting for new ones, what it writes.

Modes (`Selection.mode`, the command line's --mode):
  latest   the newest checkpoint (the default)
  step     checkpoint `Selection.step` (--step=N)
  all      every checkpoint in MODEL_DIR/checkpoints, oldest first
  follow   beside a training run: poll the checkpoints folder every `poll_seconds`,
           evaluate each new checkpoint once, oldest first, and stop once the final
           step is evaluated, or after `timeout_seconds` without a new checkpoint.
A step whose eval/<step>/metrics.json is complete (outputs.is_done) is not evaluated
again, in any mode, unless `reevaluate`: a restarted job goes on where it stopped.

Which steps exist: Orbax's own listing (`CheckpointManager.reload()` then `all_steps()`),
which counts a step only once its save is finalized: a save in progress lives in a
`<step>.orbax-checkpoint-tmp-*` folder (renamed when complete; on object stores a
commit-success file marks it), never listed. A step that training deletes
(train.keep_checkpoints) before it was evaluated is skipped with a note.

The final step, re-read at every poll (a resumed training may change it):
`Selection.final_step` if given, else the training's `train.num_steps` from
MODEL_DIR/run_record.json (written when training starts, the record of the run that
writes the checkpoints), else `num_steps` from MODEL_DIR/train_summary.json (written when
a training command ends). Unknown, follow runs until the timeout.

Several processes: every process lists and polls at the same points, process 0 decides
(which step next, wait, stop) and broadcasts, so all join the same compiled calls even
while training writes a checkpoint between two processes' listings.
"""
import dataclasses
import json
import os
import tempfile
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from pixelllm_jax.eval import outputs, summary
from pixelllm_jax.train import metrics_writer
from pixelllm_jax.train import run_record as run_record_lib

MODES = ("latest", "step", "all", "follow")
_WAIT, _FINISHED, _TIMED_OUT = -1, -2, -3


@dataclasses.dataclass(frozen=True)
class Selection:
  """Which checkpoints the job evaluates (module docstring)."""
  mode: str = "latest"
  step: int | None = None
  final_step: int | None = None
  timeout_seconds: float | None = None
  poll_seconds: float = 10.0
  reevaluate: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"unknown evaluation mode {self.mode!r}; known: {MODES}")
    if (self.step is not None) != (self.mode == "step"):
      raise ValueError("--step=N goes with --mode=step (and --mode=step needs --step)")
    if self.mode != "follow" and (self.final_step is not None or self.timeout_seconds):
      raise ValueError("--final_step and --timeout apply to --mode=follow")
    if self.poll_seconds <= 0:
      raise ValueError(f"poll_seconds must be > 0, got {self.poll_seconds}")


@dataclasses.dataclass
class JobResult:
  """metrics: step -> metrics of every step this job evaluated or found done;
  evaluated: the steps it evaluated, in order; skipped: steps found done (not
  evaluated again); timed_out: follow mode stopped waiting before the final step."""
  metrics: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
  evaluated: list[int] = dataclasses.field(default_factory=list)
  skipped: list[int] = dataclasses.field(default_factory=list)
  timed_out: bool = False

  @property
  def latest(self) -> dict[str, Any]:
    """The metrics of the highest step (empty if none)."""
    return self.metrics[max(self.metrics)] if self.metrics else {}


class Checkpoints:
  """The finalized steps under a checkpoints folder (module docstring); read only."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(create=False))

  def steps(self) -> list[int]:
    self._manager.reload()
    return sorted(int(s) for s in self._manager.all_steps())

  def close(self) -> None:
    self._manager.close()


def final_step(model_dir: str, given: int | None = None) -> int | None:
  """The training's last step (module docstring), or None if nothing says."""
  if given is not None:
    return int(given)
  record = outputs.read_json(os.path.join(model_dir, run_record_lib.FILE))
  if isinstance(record, dict) and "train.num_steps" in record.get("record", {}):
    try:
      return int(record["record"]["train.num_steps"])
    except ValueError:
      pass
  train_summary = outputs.read_json(os.path.join(model_dir, "train_summary.json"))
  if isinstance(train_summary, dict) and isinstance(train_summary.get("num_steps"), int):
    return train_summary["num_steps"]
  return None


def _agree(values: list[int]) -> list[int]:
  """Process 0's `values` on every process (a no-op in one process)."""
  if jax.process_count() == 1:
    return list(values)
  count = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
  padded = np.full(max(count, 1), _WAIT, np.int32)
  padded[:min(count, len(values))] = values[:count]
  return [int(v) for v in multihost_utils.broadcast_one_to_all(padded)[:count]]


class _Job:
  """One job's state: what it evaluated, its writer, its log (process 0)."""

  def __init__(self, evaluator, model_dir: str, selection: Selection, run_record,
               allow_config_change):
    self.evaluator, self.selection, self.model_dir = evaluator, selection, model_dir
    self.run_record, self.allow = run_record, allow_config_change
    self.record_checked = False
    self.writes = jax.process_index() == 0
    self.checkpoints = Checkpoints(os.path.join(self.model_dir, "checkpoints"))
    self.writer = None
    self.result = JobResult()
    self.attempted: set[int] = set()

  def log(self, text: str) -> None:
    if self.writes:
      print(text, flush=True)

  def done(self, step: int) -> bool:
    return outputs.is_done(self.model_dir, step, self.evaluator.splits)

  def skip_done(self, step: int) -> None:
    """Records a step evaluated by an earlier job."""
    if step not in self.result.skipped:
      self.result.skipped.append(step)
      self.result.metrics[step] = outputs.read_json(
          os.path.join(outputs.step_dir(self.model_dir, step), outputs.METRICS))
      self.log(f"step {step}: already evaluated ({outputs.step_dir(self.model_dir, step)}); "
               "not evaluated again (--reevaluate to redo it)")

  def check_record(self) -> None:
    """The model's configuration against the one the checkpoints were made with (once
    MODEL_DIR/run_record.json exists: in follow mode training may write it later)."""
    if self.run_record is None or self.record_checked:
      return
    run_record_lib.check(self.model_dir, self.run_record, what="evaluating", allow=self.allow,
                         keys=self.run_record.keys())
    self.record_checked = run_record_lib.load(self.model_dir) is not None

  def evaluate(self, step: int) -> None:
    """Evaluates checkpoint `step` and writes its outputs (process 0)."""
    self.attempted.add(step)
    self.check_record()
    start = time.perf_counter()
    try:
      params = self.evaluator.restore(self.checkpoints.directory, step)
    except Exception:  # pylint: disable=broad-except
      if step not in self.checkpoints.steps():  # deleted by training meanwhile
        self.log(f"step {step}: its checkpoint was removed before it could be evaluated "
                 "(train.keep_checkpoints); skipped")
        return
      raise
    self.log(f"evaluating step {step}")
    if self.writes:
      metrics = self.evaluator.evaluate_step(step, params,
                                             outputs.fresh_step_dir(self.model_dir, step))
    else:  # the same task code runs (it calls the model), its files go to scratch
      with tempfile.TemporaryDirectory() as scratch:
        metrics = self.evaluator.evaluate_step(step, params, scratch)
    metrics["eval_seconds"] = time.perf_counter() - start
    train_summary = outputs.read_json(os.path.join(self.model_dir, "train_summary.json"))
    if isinstance(train_summary, dict) and "train_seconds" in train_summary:
      metrics["train_seconds"] = train_summary["train_seconds"]
    if self.writes:
      if self.writer is None:
        self.writer = metrics_writer.MetricsWriter(outputs.eval_dir(self.model_dir))
      # Scalars before the step's completion mark: a crash between the two repeats the
      # step (and its scalars) rather than losing them.
      self.writer.write_scalars(step, scalars(metrics))
      self.writer.flush()
      outputs.write_step(self.model_dir, step, metrics)
      outputs.write_latest(self.model_dir)
      write_summary(self.model_dir)
      print(json.dumps(metrics, indent=1, sort_keys=True), flush=True)
    self.result.evaluated.append(step)
    self.result.metrics[step] = metrics

  def close(self) -> None:
    self.checkpoints.close()
    if self.writer is not None:
      self.writer.close()


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The numbers of a step's metrics worth a TensorBoard curve."""
  return {k: float(v) for k, v in metrics.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)
          and k not in ("checkpoint_step", "train_seconds")}


def write_summary(model_dir: str) -> None:
  """eval/summary.json from every evaluated step's metrics.json (summary.py)."""
  per_step = {s: outputs.read_json(os.path.join(outputs.step_dir(model_dir, s), outputs.METRICS))
              for s in outputs.evaluated_steps(model_dir)}
  outputs.write_json(os.path.join(outputs.eval_dir(model_dir), outputs.SUMMARY),
                     summary.summarize(per_step))


def _fixed_plan(job: _Job) -> list[int]:
  """Steps the modes latest / step / all evaluate (done ones recorded as skipped)."""
  sel, steps = job.selection, job.checkpoints.steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {job.checkpoints.directory}")
  if sel.mode == "step" and sel.step not in steps:
    raise FileNotFoundError(f"no checkpoint at step {sel.step} under "
                            f"{job.checkpoints.directory} (steps there: {steps})")
  wanted = {"latest": steps[-1:], "step": [sel.step], "all": steps}[sel.mode]
  plan = []
  for step in wanted:
    if not sel.reevaluate and job.done(step):
      job.skip_done(step)
    else:
      plan.append(step)
  return plan


def _follow_decision(job: _Job, last_progress: float) -> int:
  """Process 0's next move in follow mode: a step to evaluate, or _WAIT / _FINISHED /
  _TIMED_OUT."""
  sel, steps = job.selection, job.checkpoints.steps()
  pending = []
  for step in steps:
    if step in job.attempted:
      continue
    if not sel.reevaluate and job.done(step):
      job.skip_done(step)
    else:
      pending.append(step)
  if pending:
    return pending[0]
  last = final_step(job.model_dir, sel.final_step)
  finished = set(job.result.evaluated) | set(job.result.skipped)
  if last is not None and any(s >= last for s in finished):
    return _FINISHED
  if sel.timeout_seconds is not None and time.monotonic() - last_progress > sel.timeout_seconds:
    return _TIMED_OUT
  return _WAIT


def _follow(job: _Job) -> None:
  sel = job.selection
  last_progress, waiting_logged = time.monotonic(), None
  while True:
    decision = _agree([_follow_decision(job, last_progress)])[0]
    if decision >= 0:
      job.evaluate(decision)
      last_progress, waiting_logged = time.monotonic(), None
      continue
    last = final_step(job.model_dir, sel.final_step)
    if decision == _FINISHED:
      job.log(f"follow: the final step {last} is evaluated; done")
      return
    if decision == _TIMED_OUT:
      job.result.timed_out = True
      job.log(f"follow: no new checkpoint for {sel.timeout_seconds:g} s; stopping "
              f"(final step {last if last is not None else 'unknown'} not evaluated)")
      return
    state = (max(job.attempted | set(job.result.skipped), default=None), last)
    if state != waiting_logged:
      after = "a first checkpoint" if state[0] is None else f"a checkpoint after step {state[0]}"
      job.log(f"follow: waiting for {after} in {job.checkpoints.directory} (final step "
              f"{last if last is not None else 'unknown: stops only on --timeout'})")
      waiting_logged = state
    time.sleep(sel.poll_seconds)


def failed(model_dir: str) -> None:
  """After a failure: MODEL_DIR/metrics.json goes, so that an older one never passes
  for this job's result (every evaluated step keeps its eval/<step>/metrics.json)."""
  if jax.process_index() == 0 and outputs.remove_latest(model_dir):
    print(f"evaluation failed: removed {os.path.join(model_dir, outputs.LATEST)} (each "
          f"evaluated step keeps eval/<step>/{outputs.METRICS})", flush=True)


def run(evaluator, model_dir: str, selection: Selection, *,
        run_record: Mapping[str, str] | None = None,
        allow_config_change: bool = False) -> JobResult:
  """Evaluates `model_dir`'s checkpoints with `evaluator` (evaluator.Evaluator) as
  `selection` says (module docstring). A failure calls `failed`."""
  job = None
  try:
    job = _Job(evaluator, model_dir, selection, run_record, allow_config_change)
    if selection.mode == "follow":
      _follow(job)
    else:
      for step in _agree(_fixed_plan(job)):
        job.evaluate(step)
    if job.writes and job.result.skipped and not job.result.evaluated:
      outputs.write_latest(model_dir)  # the mirror, should it have gone missing
  except Exception:
    failed(model_dir)
    raise
  finally:
    if job is not None:
      job.close()
  return job.result
