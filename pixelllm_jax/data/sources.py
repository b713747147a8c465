"""Which prepared dataset feeds which task, configured from gin.

Each task reads one tfds builder (DESIGN.md section 3); the same builders read
the generated world (config 'world') and the real datasets (other configs).
Builders are prepared once into `data_dir` (array_record) and then served by
random-access data sources.
"""
import os

import gin
import jax
from jax.experimental import multihost_utils

from pixelllm_jax.batch import TASKS
from pixelllm_jax.data import augment as augment_lib
from pixelllm_jax.data import pipeline
from pixelllm_jax.data.builders import common
from pixelllm_jax.data.tasks import TaskConfig
from pixelllm_jax.data.tokenizer import Tokenizer

# task -> tfds builder name.
BUILDER_OF_TASK = {
    "caption": "localized_narratives",
    "trace": "localized_narratives",
    "refer": "refer",
    "loca": "vg_densecap",
}


@gin.configurable
def dataset_dirs(manual_dir: str = gin.REQUIRED, data_dir: str | None = None,
                 builder_configs: tuple[tuple[str, str], ...] = (
                     ("localized_narratives", "world"), ("refer", "world"),
                     ("vg_densecap", "world"))):
  """(manual_dir, data_dir, {builder: config}); data_dir defaults to manual_dir/tfds."""
  return manual_dir, data_dir or os.path.join(manual_dir, "tfds"), dict(builder_configs)


@gin.configurable
def task_builders(overrides: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
  """task -> builder name: BUILDER_OF_TASK with gin overrides, e.g.
  `task_builders.overrides = (('caption', 'coco_captions'),)` for COCO Karpathy captions."""
  mapping = dict(BUILDER_OF_TASK)
  for task, builder in overrides:
    if task not in mapping:
      raise ValueError(f"task_builders: unknown task {task!r}; known: {sorted(mapping)}")
    mapping[task] = builder
  return mapping


def data_source(task: str, split: str):
  """The random-access source of `task`'s builder for `split` (prepared on first use).

  Multi-host: process 0 prepares while the others wait at a barrier, then they
  reuse its files (a shared `data_dir`) or prepare their own (a local one).
  """
  manual_dir, data_dir, configs = dataset_dirs()
  builder_name = task_builders()[task]
  config_name = configs[builder_name]
  barrier = f"prepare {builder_name}/{config_name} in {data_dir}"
  multi_host, first = jax.process_count() > 1, jax.process_index() == 0
  if multi_host and not first:
    multihost_utils.sync_global_devices(barrier)
  try:
    builder = common.prepare(builder_name, config_name, manual_dir, data_dir)
  finally:  # on failure too, so the others go on to the same error rather than hang
    if multi_host and first:
      multihost_utils.sync_global_devices(barrier)
  return builder.as_data_source(split)


@gin.configurable
def tokenizer(path: str | None = None, extra_ids: int = 100) -> Tokenizer:
  """The sentencepiece model at `path` (default: `spiece.model` in the manual dir,
  where the world generator writes it). Real runs give the T5 `spiece.model`."""
  if path is None:
    path = os.path.join(dataset_dirs()[0], "spiece.model")
  return Tokenizer.from_file(path, extra_ids=extra_ids)


@gin.configurable
def train_data(*, mixture: tuple[tuple[str, float], ...] = gin.REQUIRED, split: str = "train",
               batch_size: int = gin.REQUIRED, num_slots: int = gin.REQUIRED,
               num_prompts: int = gin.REQUIRED, seed: int = 0, num_threads: int = 0,
               canvas_size: int | None = None, augment: str | None = None,
               homogeneous: bool = False,
               task_shapes: tuple[tuple[str, int, int, int, int], ...] = ()):
  """An endless iterator of numpy batches; per-host shard of every source.

  `batch_size` is global; each process reads `batch_size / process_count`.
  `canvas_size`: resize (long side) and pad images to a square canvas (needed
  for datasets whose images differ in size, and for augmentation).
  `augment`: None, or 'official' for the official per-dataset augmentation
  (`augment.OFFICIAL`: jitter + crop for refer/caption, + flip for loca).
  `homogeneous`: one task per batch, whole batches mixed (the official mixing).
  `task_shapes`: (task, num_slots, num_prompts, max_target_len,
  max_context_len) per task that does not use the shared shape (needs
  `homogeneous`; tasks outside the mixture are ignored). A text longer than
  its task's lengths is truncated keeping EOS, as with the shared
  `TaskConfig`, so give lengths that fit the data.
  """
  if augment not in (None, "official"):
    raise ValueError(f"train_data.augment must be None or 'official', got {augment!r}")
  augment_of = augment_lib.OFFICIAL if augment == "official" else {}
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(f"batch_size {batch_size} not divisible by {count} processes")
  shape_of = {task: pipeline.TaskShape(*shape) for task, *shape in task_shapes}
  unknown = sorted(set(shape_of) - set(TASKS))
  if unknown:  # shapes of known tasks outside the mixture are unused (a run may narrow it)
    raise ValueError(f"train_data.task_shapes names unknown tasks {unknown}; known: {list(TASKS)}")
  sources = [pipeline.TaskSource(task, data_source(task, split), weight, augment_of.get(task),
                                 shape_of.get(task))
             for task, weight in mixture]
  dataset = pipeline.make_train_dataset(
      sources, tokenizer(), TaskConfig(), batch_size=batch_size // count,
      num_slots=num_slots, num_prompts=num_prompts, seed=seed,
      shard_index=jax.process_index(), shard_count=count, num_threads=num_threads,
      canvas_size=canvas_size, homogeneous=homogeneous)
  return iter(dataset)
