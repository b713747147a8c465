"""Offline evaluation of a run's checkpoints (the driver the official release lacks).

  python -m pixelllm_jax.eval --gin_file=runs/demo.gin --gin.MODEL_DIR="'runs/demo'"
  python -m pixelllm_jax.eval ... --mode=follow     # beside a training run (job.py)

`evaluate` (the gin entry point, bound by runs/eval.gin) builds one `Evaluator` and hands
it to the job (job.py), which chooses the checkpoints: the latest, a chosen step, all, or
each new one as training writes it. The `Evaluator` holds what stays from one checkpoint
to the next: the data sources of every (task, split), the tokenizer and the predict
functions, compiled at the first step and reused for every later one (only the
parameters change). Each checkpoint's parameters alone are restored (no optimizer, so no
optimizer gin either), onto this run's mesh whatever mesh wrote them.

Splits: each task evaluates on its own held-out splits (`splits`: task -> split names,
e.g. RefCOCO's val, testA and testB), all in one job. Every (task, split) is opened
before anything is restored or compiled; missing ones stop the job at once, all named
(`MissingSplits`). A task with one split keeps the flat metric names its `evaluate`
returns (`refer_p@0.5`); a task with several gets one per split, the split after a slash
(`refer_p@0.5/testA`, grouped per metric in TensorBoard). Files go per split:
eval/<step>/<split>/ (outputs.py).

Several processes (`--coordinator_address ...`): every process reads every
batch of the split (the same batches as one process would), each batch
becomes one global array split over the mesh's batch axes, and the
predictions come back whole to every process. Why not a share of the split
per process: the predictions and metrics stay exactly those of one process
with all the devices, every process runs the same compiled calls in the same
order (a task's evaluation calls the model for its pictures on some batches
only, and every process must join each call), and the metas (Python objects)
never cross processes. The cost is the input work of the whole split on every
host, small next to the model's. Each process then computes the same metrics;
only process 0 writes metrics, predictions, pictures and TensorBoard scalars
(the others' tasks write into a scratch folder that is removed) and shows the
progress bar.
"""
import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from pixelllm_jax import tasks as task_registry
from pixelllm_jax.batch import Batch
from pixelllm_jax.data import pipeline
from pixelllm_jax.data.sources import DataConfig
from pixelllm_jax.eval import job as job_lib
from pixelllm_jax.eval import outputs, progress
from pixelllm_jax.model import BaseModel, DecodeSettings
from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.train import state as state_lib


class MissingSplits(ValueError):
  """Some (task, split) of `evaluate.splits` cannot be read (module docstring)."""


class Predictor:
  """The model's `predict`, jitted once per mode on the partitioner's mesh, on numpy batches.

  `params` is set per checkpoint; the compiled functions stay (same shapes and shardings).
  A batch is the *global* batch, the same on every process (module docstring);
  the predictions of all its rows come back to every process.
  """

  def __init__(self, model: BaseModel, partitioner: Partitioner, generation: DecodeSettings):
    self.params: Any = None
    self.partitioner = partitioner
    # Replicated outputs: XLA gathers every row onto every device, so each process
    # can read the whole batch's predictions (a batch-split output would leave
    # other processes' rows out of reach).
    self._fns = {
        name: partitioner.jit(
            lambda p, b, settings=settings: model.predict(p, b, settings),
            out_shardings=partitioner.replicated)
        for name, settings in (("teacher_forced", DecodeSettings("teacher_forced")),
                               ("generate", generation))}
    # Compiled at its first call only (dense captioning's evaluation; models with a box
    # decoder).
    self._fns["dense_caption"] = partitioner.jit(
        lambda p, b: model.dense_caption(p, b, generation), out_shardings=partitioner.replicated)

  def global_batch(self, batch: dict) -> Batch:
    """The numpy global batch (identical on every process) as global arrays split
    over the batch axes; each process places only the rows of its own devices."""
    sharding = self.partitioner.batch_sharding()
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
        Batch(**batch))

  def _run(self, mode: str, batch: dict):
    if self.params is None:
      raise RuntimeError("Predictor: no parameters set (restore a checkpoint first)")
    return jax.device_get(self._fns[mode](self.params, self.global_batch(batch)))

  def teacher_forced(self, batch: dict):
    return self._run("teacher_forced", batch)

  def generate(self, batch: dict):
    return self._run("generate", batch)

  def dense_caption(self, batch: dict):
    return self._run("dense_caption", batch)


def load_scenes(path: str | None) -> dict[int, dict]:
  """image_id -> scene ground truth (objects, utterance_objects), if given."""
  if not path or not os.path.exists(path):
    return {}
  scenes = {}
  with open(path) as f:
    for line in f:
      scene = json.loads(line)
      scenes[int(scene["image_id"])] = scene
  return scenes


def plan_splits(splits: Mapping[str, Any] | Sequence[tuple[str, Any]],
                tasks: Sequence[str] | None) -> dict[str, tuple[str, ...]]:
  """task -> its split names, for `tasks` (default: every task `splits` names, in
  registry order). `splits` is a mapping or (task, splits) pairs; a bare string is one
  split. Raises naming tasks without a split and unknown task names."""
  splits = dict(splits)
  task_registry.check_names(splits, "evaluate.splits")
  names = (tuple(t for t in task_registry.TASKS if t in splits) if tasks is None
           else tuple(tasks))
  task_registry.check_names(names, "evaluate.tasks")
  if not names:
    raise ValueError("evaluate.splits names no task to evaluate")
  plan = {}
  for task in names:
    value = splits.get(task, ())
    value = (value,) if isinstance(value, str) else tuple(str(s) for s in value)
    if len(set(value)) != len(value):
      raise ValueError(f"evaluate.splits: {task!r} lists a split twice: {value}")
    plan[task] = value
  without = [t for t, s in plan.items() if not s]
  if without:
    raise ValueError(f"evaluate.splits gives no split for the tasks {without} that "
                     f"evaluate.tasks asks for (splits: {splits})")
  return plan


def open_sources(data: DataConfig, plan: Mapping[str, Sequence[str]]) -> dict[tuple[str, str], Any]:
  """(task, split) -> the split's data source, every one opened (and its dataset prepared
  if it was not) before anything else; `MissingSplits` names every pair that fails."""
  sources, problems = {}, []
  for task, splits in plan.items():
    task_error = None  # the task's dataset itself fails: its other splits would too
    for split in splits:
      if task_error is not None:
        problems.append(f"{task}/{split}: {task_error}")
        continue
      try:
        source = data.data_source(task, split)
      except Exception as e:  # pylint: disable=broad-except  (all named in one error below)
        # tfds's "Unknown split 'x'. Should be one of [...]" concerns this split alone;
        # anything else is the task's dataset itself, which its other splits would hit again.
        if not (isinstance(e, ValueError) and str(e).startswith("Unknown split")):
          task_error = f"{type(e).__name__}: {e}"
        problems.append(f"{task}/{split}: {task_error or e}")
        continue
      if len(source) == 0:
        problems.append(f"{task}/{split}: the split is empty")
        continue
      sources[task, split] = source
  if problems:
    raise MissingSplits(f"evaluate.splits: {len(problems)} (task, split) cannot be evaluated "
                        "(nothing was evaluated):\n  " + "\n  ".join(problems))
  return sources


class Evaluator:
  """One model's evaluation on its tasks' splits, for any number of checkpoints
  (module docstring), of one model dir or several. Arguments as `evaluate`'s.

  abstract_params: the boxed abstract parameters (shapes, logical axis names).
  """

  def __init__(self, *, model: BaseModel, data: DataConfig,
               task_config: task_registry.TaskConfig, splits: Mapping[str, Any],
               partitioner: Partitioner | None = None, tasks: Sequence[str] | None = None,
               batch_size: int = 32, num_slots: int = 4, num_prompts: int = 4,
               scenes_path: str | None = None, num_visualizations: int = 8,
               canvas_size: int | None = None, generation: DecodeSettings | None = None):
    self.partitioner = Partitioner() if partitioner is None else partitioner
    self.splits = plan_splits(splits, tasks)
    self.partitioner.check_batch_size(batch_size, "evaluate.batch_size")
    self.tokenizer = data.tokenizer()
    self.sources = open_sources(data, self.splits)
    self.task_config, self.num_visualizations = task_config, num_visualizations
    self._pipeline = dict(batch_size=batch_size, num_slots=num_slots, num_prompts=num_prompts,
                          canvas_size=canvas_size)
    self._scenes_path = scenes_path or os.path.join(data.manual_dir, "scenes", "{split}.jsonl")
    self._scenes: dict[str, dict] = {}
    self.writes = jax.process_index() == 0

    task, split = next(iter(self.sources))
    init_batch = Batch(**next(iter(self._batches(task, self.sources[task, split])))[0])
    model.check_batch(init_batch)
    self.abstract_params, _ = self.partitioner.abstract_params(
        state_lib.param_init_fn(model, init_batch))
    if generation is None:
      generation = DecodeSettings("greedy", max_len=task_config.max_target_len)
    if generation.mode == "teacher_forced":
      raise ValueError("evaluate.generation: a generating mode ('greedy', 'beam'), not "
                       "'teacher_forced'")
    self.predictor = Predictor(model, self.partitioner, generation)

  def _batches(self, task: str, source: Any):
    return pipeline.eval_batches(task, source, self.tokenizer, self.task_config,
                                 **self._pipeline)

  def _scenes_of(self, split: str) -> dict:
    if split not in self._scenes:
      self._scenes[split] = load_scenes(self._scenes_path.format(split=split))
    return self._scenes[split]

  def restore(self, checkpoint_dir: str, step: int) -> Any:
    """The parameters (only) of checkpoint `step` under `checkpoint_dir`, on this mesh."""
    _, params = self.partitioner.restore_params(checkpoint_dir, self.abstract_params, step=step)
    return params

  def evaluate_step(self, step: int, params: Any, out_root: str) -> dict[str, Any]:
    """Metrics of `params` (checkpoint `step`) on every (task, split); each task's files
    under `out_root/<split>/`. Raises `outputs.NonFiniteMetric` naming a NaN metric."""
    self.predictor.params = params
    metrics: dict[str, Any] = {"checkpoint_step": int(step),
                               "splits": {t: list(s) for t, s in self.splits.items()}}
    for task, splits in self.splits.items():
      for split in splits:
        out_dir = os.path.join(out_root, split)
        os.makedirs(out_dir, exist_ok=True)
        ctx = task_registry.base.EvalContext(
            teacher_forced=self.predictor.teacher_forced, generate=self.predictor.generate,
            tokenizer=self.tokenizer, out_dir=out_dir,
            num_visualizations=self.num_visualizations, scenes=self._scenes_of(split),
            dense_caption=self.predictor.dense_caption)
        with progress.tracked(self.sources[task, split], f"step {step} {task}/{split}",
                              show=self.writes) as source:
          result = task_registry.get(task).evaluate(ctx, self._batches(task, source))
        suffix = f"/{split}" if len(splits) > 1 else ""
        metrics.update({f"{name}{suffix}": value for name, value in result.items()})
    metrics = outputs.plain(metrics)
    outputs.check_finite(metrics, f"step {step}")
    return metrics


def evaluate(*, model_dir: str, model: BaseModel, data: DataConfig,
             task_config: task_registry.TaskConfig, splits: Mapping[str, Any],
             partitioner: Partitioner | None = None, tasks: Sequence[str] | None = None,
             batch_size: int = 32, num_slots: int = 4, num_prompts: int = 4,
             scenes_path: str | None = None, num_visualizations: int = 8,
             canvas_size: int | None = None, run_record: Mapping[str, str] | None = None,
             allow_config_change: bool = False,
             selection: job_lib.Selection | None = None,
             generation: DecodeSettings | None = None) -> job_lib.JobResult:
  """Evaluates `model_dir`'s checkpoints as `selection` says (default: the latest).

  `splits`: task -> its split names (one string or a tuple), e.g.
  `{'refer': ('val', 'testA', 'testB'), 'caption': ('val',)}`.
  `tasks`: the tasks to evaluate (default: every task `splits` names); each needs
  an entry in `splits`.
  `canvas_size`: resize (long side) and pad every image to this square canvas,
  as training does with `train_data.canvas_size` (needed for real datasets).
  `scenes_path`: the generated world's scene ground truth (trace pointing
  accuracy), `{split}` standing for the split; default
  `<manual_dir>/scenes/{split}.jsonl` where it exists.
  `run_record`: the model's part of the run record (the command line gives it);
  evaluation stops if it differs from the one the checkpoints were made with,
  unless `allow_config_change`.
  `batch_size`: global; with several processes each reads every batch (module
  docstring). Every process returns the metrics; process 0 alone writes.
  `generation`: how tasks that generate text decode (`DecodeSettings`: greedy or beam,
  max_len, beam_size, alpha, suppress_repeat); default greedy up to
  `TaskConfig.max_target_len` tokens.
  `selection`: which checkpoints, and how long to wait for new ones (job.py; the
  command line's --mode, --step, --final_step, --timeout, --poll_seconds,
  --reevaluate).

  A failure (a missing split, a NaN metric, ...) removes MODEL_DIR/metrics.json, so
  an older one never passes for this job's result; every evaluated step keeps its
  eval/<step>/metrics.json.
  """
  try:
    evaluator = Evaluator(
        model=model, data=data, task_config=task_config, splits=splits,
        partitioner=partitioner, tasks=tasks, batch_size=batch_size, num_slots=num_slots,
        num_prompts=num_prompts, scenes_path=scenes_path,
        num_visualizations=num_visualizations, canvas_size=canvas_size, generation=generation)
  except Exception:
    job_lib.failed(model_dir)
    raise
  return job_lib.run(evaluator, model_dir, selection or job_lib.Selection(),
                     run_record=run_record, allow_config_change=allow_config_change)
