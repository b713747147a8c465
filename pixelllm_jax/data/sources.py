"""Which prepared dataset feeds which task, and the training stream built from them.

Each task reads one tfds builder (its `Task.builder`, docs/DATA_FORMATS.md;
`DataConfig.task_builders` routes a task to another, e.g. captions from
`coco_captions`); the same builders read the generated world (config 'world')
and the real datasets (other configs). Builders are prepared once into
`data_dir` (array_record) and then served by random-access data sources,
which leave the features a task never reads (`Task.unread_features`) encoded.
"""
import dataclasses
import os

import jax
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from pixelllm_jax import tasks
from pixelllm_jax.data import pipeline
from pixelllm_jax.data.builders import common
from pixelllm_jax.data.tokenizer import Tokenizer

WORLD_BUILDER_CONFIGS = (("localized_narratives", "world"), ("refer", "world"),
                         ("vg_densecap", "world"))


class _KeepEncoded(tfds.decode.SkipDecoding):
  """A feature left as its stored bytes (a PNG stays a PNG), also inside a
  `Sequence` (tfds's SkipDecoding lacks that numpy path)."""

  def decode_batch_example_np(self, serialized):
    return serialized


def _has_feature(features, path: str) -> bool:
  for key in path.split("/"):
    features = getattr(features, "feature", features)  # through a Sequence to its dict
    if not isinstance(features, tfds.features.FeaturesDict) or key not in features.keys():
      return False
    features = features[key]
  return True


def task_data_source(builder: tfds.core.DatasetBuilder, split: str, task: str):
  """`builder`'s `split` as read by `task`: random access, len(); the
  features it never reads (`Task.unread_features`, where `builder` has them)
  come out encoded, undecoded (the pipeline then drops them)."""
  decoders: dict = {}
  for path in tasks.get(task).unread_features:
    if _has_feature(builder.info.features, path):
      *parents, leaf = path.split("/")
      node = decoders
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = _KeepEncoded()
  if not decoders:
    return builder.as_data_source(split)
  return builder.as_data_source(split, decoders=decoders)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where a run's data lives and how it is read.

  manual_dir: the tfds manual dir holding the official files (and images).
  data_dir: where prepared builders go (default: manual_dir/tfds).
  builder_configs: (builder, config) pairs: which config of each builder to read.
  task_builders: (task, builder) overrides of a task's own `Task.builder`.
  tokenizer_path: the sentencepiece model (default: manual_dir/spiece.model,
    where the world generator writes it); real runs give T5's `spiece.model`.
  extra_ids: T5 sentinel ids appended after the model's pieces (T5: 100).
  """
  manual_dir: str
  data_dir: str | None = None
  builder_configs: tuple[tuple[str, str], ...] = WORLD_BUILDER_CONFIGS
  task_builders: tuple[tuple[str, str], ...] = ()
  tokenizer_path: str | None = None
  extra_ids: int = 100

  def __post_init__(self):
    for field in ("builder_configs", "task_builders"):
      object.__setattr__(self, field, tuple(tuple(pair) for pair in getattr(self, field)))
    tasks.check_names([task for task, _ in self.task_builders], "DataConfig.task_builders")

  @property
  def prepared_dir(self) -> str:
    return self.data_dir or os.path.join(self.manual_dir, "tfds")

  def builder_of(self, task: str) -> str:
    """The tfds builder that feeds `task`."""
    return dict(self.task_builders).get(task, tasks.get(task).builder)

  @property
  def tokenizer_file(self) -> str:
    return self.tokenizer_path or os.path.join(self.manual_dir, "spiece.model")

  def tokenizer(self) -> Tokenizer:
    if not os.path.exists(self.tokenizer_file):
      raise FileNotFoundError(f"tokenizer {self.tokenizer_file} not found (DataConfig."
                              f"{'tokenizer_path' if self.tokenizer_path else 'manual_dir'})")
    return Tokenizer.from_file(self.tokenizer_file, extra_ids=self.extra_ids)

  def data_source(self, task: str, split: str):
    """The random-access source of `task`'s builder for `split` (prepared on first use).

    Multi-host: process 0 prepares while the others wait at a barrier, then they
    reuse its files (a shared `data_dir`) or prepare their own (a local one).
    """
    builder_name = self.builder_of(task)
    configs = dict(self.builder_configs)
    if builder_name not in configs:
      raise ValueError(f"task {task!r} reads builder {builder_name!r}, which "
                       f"DataConfig.builder_configs {self.builder_configs} gives no config")
    config_name = configs[builder_name]
    barrier = f"prepare {builder_name}/{config_name} in {self.prepared_dir}"
    multi_host, first = jax.process_count() > 1, jax.process_index() == 0
    if multi_host and not first:
      multihost_utils.sync_global_devices(barrier)
    try:
      builder = common.prepare(builder_name, config_name, self.manual_dir, self.prepared_dir)
    finally:  # on failure too, so the others go on to the same error rather than hang
      if multi_host and first:
        multihost_utils.sync_global_devices(barrier)
    return task_data_source(builder, split, task)


def train_data(*, data: DataConfig, task_config: tasks.TaskConfig,
               mixture: tuple[tuple[str, float], ...], batch_size: int, num_slots: int,
               num_prompts: int, split: str = "train", seed: int = 0, num_threads: int = 0,
               canvas_size: int | None = None, augment: str | None = None,
               homogeneous: bool = False,
               task_shapes: tuple[tuple[str, int, int, int, int], ...] = ()):
  """An endless iterator of numpy batches; per-host shard of every source.

  `batch_size` is global; each process reads `batch_size / process_count`.
  `canvas_size`: resize (long side) and pad images to a square canvas (needed
  for datasets whose images differ in size, and for augmentation).
  `augment`: None, or 'official' for each task's official augmentation
  (`Task.official_augment`: jitter + crop for refer/caption, + flip for loca).
  `homogeneous`: one task per batch, whole batches mixed (the official mixing).
  `task_shapes`: (task, num_slots, num_prompts, max_target_len,
  max_context_len) per task that does not use the shared shape (needs
  `homogeneous`; tasks outside the mixture are ignored). A text longer than
  its task's lengths is truncated keeping EOS, as with the shared
  `TaskConfig`, so give lengths that fit the data.
  """
  if augment not in (None, "official"):
    raise ValueError(f"train_data.augment must be None or 'official', got {augment!r}")
  tasks.check_names([task for task, _ in mixture], "train_data.mixture")
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(f"batch_size {batch_size} not divisible by {count} processes")
  shape_of = {task: pipeline.TaskShape(*shape) for task, *shape in task_shapes}
  # Shapes of known tasks outside the mixture are unused (a run may narrow it).
  tasks.check_names(shape_of, "train_data.task_shapes")
  sources = [pipeline.TaskSource(
      task, data.data_source(task, split), weight,
      tasks.get(task).official_augment if augment == "official" else None, shape_of.get(task))
             for task, weight in mixture]
  dataset = pipeline.make_train_dataset(
      sources, data.tokenizer(), task_config, batch_size=batch_size // count,
      num_slots=num_slots, num_prompts=num_prompts, seed=seed,
      shard_index=jax.process_index(), shard_count=count, num_threads=num_threads,
      canvas_size=canvas_size, homogeneous=homogeneous)
  return iter(dataset)
