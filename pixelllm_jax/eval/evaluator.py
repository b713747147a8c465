"""Offline evaluation of a trained checkpoint (the driver the official release lacks).

  python -m pixelllm_jax.eval --gin_file=runs/demo.gin --gin.MODEL_DIR="'runs/demo'"

Restores the parameters (only) of the latest checkpoint in MODEL_DIR onto the
partitioner's mesh, runs each task's own evaluation (`Task.evaluate`,
pixelllm_jax/tasks/) on the held-out split and writes MODEL_DIR/metrics.json,
PNG visualizations and every prediction under MODEL_DIR/eval/.

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
only process 0 writes metrics.json, predictions and pictures (the others'
tasks write into a scratch folder that is removed).
"""
import contextlib
import json
import os
import tempfile
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from pixelllm_jax import tasks as task_registry
from pixelllm_jax.batch import Batch
from pixelllm_jax.data import pipeline
from pixelllm_jax.data.sources import DataConfig
from pixelllm_jax.model import BaseModel, DecodeSettings
from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.train import run_record as run_record_lib
from pixelllm_jax.train import state as state_lib


class Predictor:
  """The model's `predict`, jitted once per mode on the partitioner's mesh, on numpy batches.

  A batch is the *global* batch, the same on every process (module docstring);
  the predictions of all its rows come back to every process.
  """

  def __init__(self, model: BaseModel, params: Any, partitioner: Partitioner,
               max_decode_len: int):
    self.params, self.partitioner = params, partitioner
    # Replicated outputs: XLA gathers every row onto every device, so each process
    # can read the whole batch's predictions (a batch-split output would leave
    # other processes' rows out of reach).
    self._fns = {
        mode: partitioner.jit(
            lambda p, b, settings=DecodeSettings(mode=mode, max_len=max_decode_len):
            model.predict(p, b, settings), out_shardings=partitioner.replicated)
        for mode in ("teacher_forced", "greedy")}

  def global_batch(self, batch: dict) -> Batch:
    """The numpy global batch (identical on every process) as global arrays split
    over the batch axes; each process places only the rows of its own devices."""
    sharding = self.partitioner.batch_sharding()
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
        Batch(**batch))

  def _run(self, mode: str, batch: dict):
    return jax.device_get(self._fns[mode](self.params, self.global_batch(batch)))

  def teacher_forced(self, batch: dict):
    return self._run("teacher_forced", batch)

  def generate(self, batch: dict):
    return self._run("greedy", batch)


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


def evaluate(*, model_dir: str, model: BaseModel, data: DataConfig,
             task_config: task_registry.TaskConfig, partitioner: Partitioner | None = None,
             split: str = "test", tasks: Sequence[str] | None = None,
             batch_size: int = 32, num_slots: int = 4, num_prompts: int = 4,
             scenes_path: str | None = None, num_visualizations: int = 8,
             canvas_size: int | None = None, run_record: Mapping[str, str] | None = None,
             allow_config_change: bool = False) -> dict[str, Any]:
  """Evaluates the latest checkpoint of `model_dir`; writes metrics.json and PNGs.

  `tasks`: the tasks to evaluate, each on its own evaluation (default: every
  registered task).
  `canvas_size`: resize (long side) and pad every image to this square canvas,
  as training does with `train_data.canvas_size` (needed for real datasets).
  `scenes_path`: the generated world's scene ground truth (trace pointing
  accuracy); default `<manual_dir>/scenes/<split>.jsonl` when it exists.
  `run_record`: the model's part of the run record (the command line gives it);
  evaluation stops if it differs from the one the checkpoints were made with,
  unless `allow_config_change`.
  `batch_size`: global; with several processes each reads every batch (module
  docstring). Every process returns the metrics; process 0 alone writes.
  """
  start = time.perf_counter()
  partitioner = Partitioner() if partitioner is None else partitioner
  tasks = task_registry.TASKS if tasks is None else tuple(tasks)
  task_registry.check_names(tasks, "evaluate.tasks")
  partitioner.check_batch_size(batch_size, "evaluate.batch_size")
  if run_record is not None:
    run_record_lib.check(model_dir, run_record, what="evaluating", allow=allow_config_change,
                         keys=run_record.keys())
  tokenizer = data.tokenizer()
  writes = jax.process_index() == 0
  out_dir = os.path.join(model_dir, "eval")
  if writes:
    os.makedirs(out_dir, exist_ok=True)

  def batches(task):
    return pipeline.eval_batches(task, data.data_source(task, split), tokenizer, task_config,
                                 batch_size=batch_size, num_slots=num_slots,
                                 num_prompts=num_prompts, canvas_size=canvas_size)

  init_batch = Batch(**next(iter(batches(tasks[0])))[0])
  model.check_batch(init_batch)
  boxed, _ = partitioner.abstract_params(state_lib.param_init_fn(model, init_batch))
  step, params = partitioner.restore_params(os.path.join(model_dir, "checkpoints"), boxed)
  predictor = Predictor(model, params, partitioner, task_config.max_target_len)
  if scenes_path is None:
    scenes_path = os.path.join(data.manual_dir, "scenes", f"{split}.jsonl")
  metrics: dict[str, Any] = {"checkpoint_step": step, "split": split}
  # The other processes run the same task code (pictures included: they call the
  # model), so their files go to a scratch folder.
  with (contextlib.nullcontext(out_dir) if writes else tempfile.TemporaryDirectory()) as task_dir:
    ctx = task_registry.base.EvalContext(
        teacher_forced=predictor.teacher_forced, generate=predictor.generate,
        tokenizer=tokenizer, out_dir=task_dir, num_visualizations=num_visualizations,
        scenes=load_scenes(scenes_path))
    for task in tasks:
      task_start = time.perf_counter()
      metrics.update(task_registry.get(task).evaluate(ctx, batches(task)))
      print(f"eval {task}: {time.perf_counter() - task_start:.1f} s", flush=True)
  summary_path = os.path.join(model_dir, "train_summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      metrics["train_seconds"] = json.load(f)["train_seconds"]
  metrics["eval_seconds"] = time.perf_counter() - start
  metrics = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in metrics.items()}
  if writes:
    with open(os.path.join(model_dir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=1, sort_keys=True)
    print(json.dumps(metrics, indent=1, sort_keys=True), flush=True)
  return metrics
