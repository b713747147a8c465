"""Caption slots -> fixed-shape numpy batches: a seeded task mixture for
training, and an exhaustive in-order pass for evaluation.

Shapes (B batch, K prompts, N slots, L = TaskConfig.max_target_len,
Lc = max_context_len, P = points_per_token) are those of `batch.Batch`; every
example is a dict with exactly its fields, without the batch dim.

Choices:
- Slots with identical prompt boxes share one prompt (the prompt path runs once
  per distinct box, not once per slot as in the official code, which
  recomputed the full-image prompt 16 times).
- Training: per source, records are sharded per host, shuffled with a seed
  and repeated forever (reshuffled each epoch); sources are interleaved by
  `grain.MapDataset.mix` (deterministic, proportional to the weights); each
  mixed element's slot subset is drawn from `np.random.default_rng([seed,
  shard_index, index])`, so the whole stream is a pure function of the global
  index: same seed, same batches, and the grain iterator state (one index)
  resumes exactly. By default batches are whole mixed examples, so one batch
  can hold several tasks.
- `homogeneous=True` is the official mixing instead: each source is batched
  on its own and whole batches are mixed, so a batch holds one task and may
  have that task's own `TaskShape` (slots, prompts, text lengths): a referring batch need not carry a narrative's 32
  decoder positions, nor a narrative batch three empty slots. Slot subsets
  and augmentation then draw from (seed, shard_index, 2, source, index): the
  stream is again a pure function of one index and resumes exactly. Which
  source a batch comes from depends on the weights and the index alone, so
  every host picks the same task at each step and the global batch has one
  shape.
- Evaluation never truncates: an image with more slots than N (or more distinct
  prompts than K) continues in further rows with the same image.
- Images: without `canvas_size` they are used as they are (images of one
  batch must share a size: the generated world). With `canvas_size` every
  image is resized and padded bottom/right onto a square canvas
  (`augment.transform_record`; training shrinks only, evaluation scales the
  long side to the canvas) and `image_valid_hw` says how much of it is image.
- Mask targets: a batch stream that holds a mask task (`Task.mask_loss`:
  the stream's one task when homogeneous, any task of the mixture otherwise)
  carries `mask_targets` bool[B, N, H, W] on the image; other streams leave
  the field out (None in `Batch`), so they neither carry nor compute masks.
- Detection targets, likewise: a stream that holds a detection task
  (`Task.detection`: dense captioning) carries `det_boxes` float32[B, G, 4]
  and `det_valid` bool[B, G], G = `TaskConfig.max_detection_boxes`: every
  ground-truth box of the image after augmentation (`Task.detection_boxes`),
  not only those of the slots drawn, so an undrawn region is never a
  negative for the box decoder. Records of other tasks in such a stream
  carry none (all invalid).
- Features a task never reads (`Task.unread_features`, e.g. refer's
  per-object masks) are dropped from each record first: `sources` leaves them
  encoded, and dropped they are not resampled by augmentation either.
- Augmentation (training, per source `TaskSource.augment`, needs
  `canvas_size`) runs on the decoded record *before* tokenization, so
  contexts, targets and prompts of a cropped or flipped record stay in step
  (augment.py). Its draws come from `np.random.default_rng([seed,
  shard_index, index, 1])`, a stream apart from the slot subset's, so turning
  augmentation on leaves the slot choice alone and resumption stays exact.
"""
import dataclasses
from typing import Any, Iterator, NamedTuple, Sequence

import grain
import numpy as np

from pixelllm_jax import tasks
from pixelllm_jax.batch import EMPTY_SLOT, shift_right
from pixelllm_jax.data import augment as augment_lib
from pixelllm_jax.tasks import Slot, TaskConfig, TextEncoder


class TaskShape(NamedTuple):
  """A source's own batch shape (homogeneous batches only): N, K, L, Lc."""
  num_slots: int
  num_prompts: int
  max_target_len: int
  max_context_len: int


class TaskSource(NamedTuple):
  """One entry of a training mixture. `data_source`: random access, len().
  `augment`: this source's training augmentation (None: none).
  `shape`: this source's batch shape (None: the dataset's; needs homogeneous)."""
  task: str
  data_source: Any
  weight: float
  augment: augment_lib.AugmentConfig | None = None
  shape: TaskShape | None = None


def _prompt_key(slot: Slot) -> tuple[float, ...]:
  return tuple(np.asarray(slot.prompt_box, np.float32).tolist())


def pack_example(image: np.ndarray, slots: Sequence[Slot], *, num_prompts: int,
                 num_slots: int, config: TaskConfig,
                 image_valid_hw: np.ndarray | None = None,
                 with_masks: bool = False,
                 detection_boxes: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One image and up to N slots -> the Batch fields without the batch dim.

  Returns image uint8[H, W, 3], image_valid_hw float32[2] (as given; default
  1, 1: unpadded),
  prompt_boxes float32[K, 4] (distinct boxes first, [0, 0, 1, 1] after),
  prompt_index int32[N], context_tokens int32[N, Lc],
  decoder_input_tokens / decoder_target_tokens int32[N, L],
  decoder_loss_weights float32[N, L], point_targets float32[N, L, P, 2],
  point_weights float32[N, L], task_ids int32[N] (EMPTY_SLOT for unused slots,
  which are otherwise all zero); with `with_masks`, mask_targets bool[N, H, W]
  (each slot's `Slot.mask`, all False for slots without one); with
  `detection_boxes` (float32[M, 4], a detection stream's; M may be 0),
  det_boxes float32[G, 4] and det_valid bool[G], the first G of them.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
  if len(slots) > num_slots:
    raise ValueError(f"{len(slots)} slots do not fit num_slots={num_slots}")
  length, context_len, p = config.max_target_len, config.max_context_len, config.points_per_token

  prompt_of_key: dict[tuple[float, ...], int] = {}
  for slot in slots:
    prompt_of_key.setdefault(_prompt_key(slot), len(prompt_of_key))
  if len(prompt_of_key) > num_prompts:
    raise ValueError(f"{len(prompt_of_key)} distinct prompt boxes do not fit num_prompts={num_prompts}")
  prompt_boxes = np.tile(tasks.base.FULL_IMAGE_BOX, (num_prompts, 1))
  for key, k in prompt_of_key.items():
    prompt_boxes[k] = key

  out = {
      "prompt_index": np.zeros(num_slots, np.int32),
      "context_tokens": np.zeros((num_slots, context_len), np.int32),
      "decoder_target_tokens": np.zeros((num_slots, length), np.int32),
      "decoder_loss_weights": np.zeros((num_slots, length), np.float32),
      "point_targets": np.zeros((num_slots, length, p, 2), np.float32),
      "point_weights": np.zeros((num_slots, length), np.float32),
      "task_ids": np.full(num_slots, EMPTY_SLOT, np.int32),
  }
  for n, slot in enumerate(slots):
    if len(slot.target) > length or len(slot.context) > context_len:
      raise ValueError(f"slot {n} ({slot.task}) is longer than the config allows")
    if slot.point_targets.shape != (length, p, 2):
      raise ValueError(f"slot {n} point_targets {slot.point_targets.shape} != {(length, p, 2)}")
    out["prompt_index"][n] = prompt_of_key[_prompt_key(slot)]
    out["context_tokens"][n, : len(slot.context)] = slot.context
    out["decoder_target_tokens"][n, : len(slot.target)] = slot.target
    out["decoder_loss_weights"][n] = slot.loss_weights
    out["point_targets"][n] = slot.point_targets
    out["point_weights"][n] = slot.point_weights
    out["task_ids"][n] = tasks.TASK_ID[slot.task]
  if with_masks:
    out["mask_targets"] = np.zeros((num_slots, *image.shape[:2]), bool)
    for n, slot in enumerate(slots):
      if slot.mask is not None:
        if slot.mask.shape != image.shape[:2]:
          raise ValueError(f"slot {n} ({slot.task}) mask {slot.mask.shape} is not on its image "
                           f"{image.shape[:2]}")
        out["mask_targets"][n] = slot.mask
  elif any(slot.mask is not None for slot in slots):
    raise ValueError("slots with masks need with_masks=True (a mask task's stream)")
  if detection_boxes is not None:
    boxes = np.asarray(detection_boxes, np.float32).reshape(-1, 4)[:config.max_detection_boxes]
    out["det_boxes"] = np.zeros((config.max_detection_boxes, 4), np.float32)
    out["det_valid"] = np.zeros(config.max_detection_boxes, bool)
    out["det_boxes"][:len(boxes)] = boxes
    out["det_valid"][:len(boxes)] = True
  return {
      "image": image,
      "image_valid_hw": (np.ones(2, np.float32) if image_valid_hw is None
                         else np.asarray(image_valid_hw, np.float32).reshape(2)),
      "prompt_boxes": prompt_boxes,
      "decoder_input_tokens": shift_right(out["decoder_target_tokens"]),
      **out,
  }


def stack_examples(examples: Sequence[dict[str, np.ndarray]],
                   names: Sequence[str]) -> dict[str, np.ndarray]:
  """Stacks examples into a batch; images must share a size (no resize here)."""
  sizes = {e["image"].shape for e in examples}
  if len(sizes) > 1:
    listing = ", ".join(f"{name}: {e['image'].shape}" for name, e in zip(names, examples))
    raise ValueError(f"images of one batch must share a size (resize them upstream); got {listing}")
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def _fits(slot: Slot, chosen: Sequence[Slot], num_slots: int, num_prompts: int) -> bool:
  """Whether `slot` can join `chosen` without exceeding N slots or K prompts."""
  if len(chosen) >= num_slots:
    return False
  keys = {_prompt_key(s) for s in chosen}
  return _prompt_key(slot) in keys or len(keys) < num_prompts


def rows_of_slots(slots: Sequence[Slot], num_slots: int, num_prompts: int) -> list[list[Slot]]:
  """All slots, in order, split into rows of <= N slots with <= K distinct prompts."""
  rows: list[list[Slot]] = [[]]
  for slot in slots:
    if not _fits(slot, rows[-1], num_slots, num_prompts):
      rows.append([])
    rows[-1].append(slot)
  return rows if rows[-1] else rows[:-1]


def with_masks(task_names: Sequence[str]) -> bool:
  """Whether a batch stream over these tasks carries `mask_targets` (module docstring)."""
  return any(tasks.get(t).mask_loss for t in task_names)


def with_detection(task_names: Sequence[str]) -> bool:
  """Whether a batch stream over these tasks carries detection targets (module docstring)."""
  return any(tasks.get(t).detection for t in task_names)


def detection_boxes(task: str, record: dict, stream_has_detection: bool) -> np.ndarray | None:
  """The detection targets `pack_example` takes for `record` of `task` in a stream
  with or without them: None without, no boxes for a task that detects nothing."""
  if not stream_has_detection:
    return None
  task_ = tasks.get(task)
  return task_.detection_boxes(record) if task_.detection else np.zeros((0, 4), np.float32)


def _record_name(task: str, index: int, record: dict) -> str:
  return f"{task} record {index} (image_id={record.get('image_id')!r})"


class _Tag:
  """record -> (task, source index, record, augment); a class so grain workers can pickle it."""

  def __init__(self, task: str, augment: augment_lib.AugmentConfig | None):
    self.task, self.augment = task, augment

  def __call__(self, index: int, record: dict):
    return self.task, index, record, self.augment


class _TrainExample:
  """(task, index, record, augment) at stream index i -> (name, packed example):
  the record put on the canvas and augmented with draws from (*key, i, 1),
  then a random subset of its slots drawn from (*key, i); key = (seed, shard)
  for mixed examples, (seed, shard, 2, source) for one source's stream."""

  def __init__(self, tokenizer: TextEncoder, config: TaskConfig, num_slots: int,
               num_prompts: int, key: tuple[int, ...], canvas_size: int | None,
               masks: bool = False, detection: bool = False):
    self.tokenizer, self.config = tokenizer, config
    self.num_slots, self.num_prompts = num_slots, num_prompts
    self.key = tuple(key)
    self.canvas_size = canvas_size
    self.masks, self.detection = masks, detection

  def __call__(self, index: int, tagged) -> tuple[str, dict[str, np.ndarray]]:
    task, record_index, source_record, augment = tagged
    record = tasks.base.without_features(source_record, tasks.get(task).unread_features)
    valid_hw = None
    if self.canvas_size is not None:
      augment_rng = np.random.default_rng([*self.key, index, 1])
      record, valid_hw = augment_lib.transform_record(
          record, tasks.get(task), canvas=self.canvas_size, augment=augment, train=True,
          rng=augment_rng)
    slots = tasks.make_slots(task, record, self.tokenizer, self.config)
    rng = np.random.default_rng([*self.key, index])
    chosen: list[Slot] = []
    for i in rng.permutation(len(slots)):
      if _fits(slots[i], chosen, self.num_slots, self.num_prompts):
        chosen.append(slots[i])
    example = pack_example(record["image"], chosen, num_prompts=self.num_prompts,
                           num_slots=self.num_slots, config=self.config, image_valid_hw=valid_hw,
                           with_masks=self.masks,
                           detection_boxes=detection_boxes(task, record, self.detection))
    return _record_name(task, record_index, source_record), example


def _stack_named(named: Sequence[tuple[str, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
  names, examples = zip(*named)
  return stack_examples(examples, names)


def make_train_dataset(sources: Sequence[TaskSource | tuple[str, Any, float]],
                       tokenizer: TextEncoder, task_config: TaskConfig, *,
                       batch_size: int, num_slots: int, num_prompts: int, seed: int,
                       shard_index: int = 0, shard_count: int = 1, num_threads: int = 0,
                       worker_count: int = 0, canvas_size: int | None = None,
                       homogeneous: bool = False) -> grain.IterDataset:
  """An endless, seeded task mixture of batched dicts (Batch fields, leading B).

  Args:
    sources: (task, data_source, weight[, augment[, shape]]) per source; task
      in batch.TASKS; augment an `augment.AugmentConfig` or None; shape a
      `TaskShape` or None (the shape given here: N, K and `task_config`).
    batch_size: B (per host); incomplete batches never occur (endless stream).
    seed: fixes shuffles and slot subsets; same seed -> same batches.
    shard_index, shard_count: this host's share of every source's records.
    num_threads: grain read threads (0 = read in the calling thread).
    worker_count: grain worker processes (0 = none; needs absl flags parsed
      and a picklable tokenizer and data sources).
    canvas_size: None: images as they are (same size); else the square canvas
      side every image is resized (shrunk only, or augmented) and padded to.
    homogeneous: batch each source on its own and mix whole batches (the
      official mixing); needed for per-source shapes.

  Returns:
    A grain IterDataset; its iterators support get_state() / set_state() for
    exact resumption.
  """
  if not sources:
    raise ValueError("make_train_dataset needs at least one source")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")

  def to_batches(ds, config: TaskConfig, n: int, k: int, key: tuple[int, ...],
                 names: Sequence[str]):
    examples = ds.map_with_index(_TrainExample(tokenizer, config, n, k, key, canvas_size,
                                               with_masks(names), with_detection(names)))
    return examples.batch(batch_size, drop_remainder=True, batch_fn=_stack_named)

  per_source, weights, names = [], [], []
  for i, source in enumerate(sources):
    task, data_source, weight, augment, shape = TaskSource(*source)
    tasks.get(task)  # an unknown task fails here, naming the known ones
    names.append(task)
    if augment is not None and canvas_size is None:
      raise ValueError(f"source {i} ({task}) is augmented: give canvas_size")
    if shape is not None and not homogeneous:
      raise ValueError(f"source {i} ({task}) has its own shape: mixed batches need one "
                       "shape for all (homogeneous=True batches each source on its own)")
    ds = grain.MapDataset.source(data_source).map_with_index(_Tag(task, augment))
    ds = ds[shard_index::shard_count]
    if len(ds) == 0:
      raise ValueError(f"source {i} ({task}) has no records for shard {shard_index}/{shard_count}")
    source_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
    ds = ds.shuffle(seed=source_seed).repeat()
    if homogeneous:
      n, k, config = num_slots, num_prompts, task_config
      if shape is not None:
        n, k = shape.num_slots, shape.num_prompts
        config = dataclasses.replace(task_config, max_target_len=shape.max_target_len,
                                     max_context_len=shape.max_context_len)
      ds = to_batches(ds, config, n, k, (seed, shard_index, 2, i), [task])
    per_source.append(ds)
    weights.append(float(weight))
  mixed = grain.MapDataset.mix(per_source, weights)
  batches = mixed if homogeneous else to_batches(
      mixed, task_config, num_slots, num_prompts, (seed, shard_index), names)
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1))
  iter_ds = batches.to_iter_dataset(read_options)
  if worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter_ds


def eval_batches(task_name: str, data_source, tokenizer: TextEncoder, task_config: TaskConfig, *,
                 batch_size: int, num_slots: int, num_prompts: int,
                 canvas_size: int | None = None
                 ) -> Iterator[tuple[dict[str, np.ndarray], list[tuple[int, int, dict]]]]:
  """Every slot of every record exactly once, in order, as fixed-shape batches.

  With `canvas_size`, each image is resized so its long side is the canvas
  (official eval) and padded; `meta` coordinates stay those of the record
  (normalized, so they hold for the original image too).

  Yields (batch, metas): batch has the Batch fields with leading B; metas
  lists (row, slot, meta) for the real slots only. The last batch is padded
  with empty rows (a zero image of the batch's size, task_ids = EMPTY_SLOT).
  """
  pending: list[tuple[str, np.ndarray, list[Slot], np.ndarray | None, np.ndarray | None]] = []
  masks, detection = with_masks([task_name]), with_detection([task_name])

  def flush():
    examples = [pack_example(image, row, num_prompts=num_prompts, num_slots=num_slots,
                             config=task_config, image_valid_hw=valid_hw, with_masks=masks,
                             detection_boxes=boxes)
                for _, image, row, valid_hw, boxes in pending]
    names = [entry[0] for entry in pending]
    empty = np.zeros_like(pending[0][1])
    while len(examples) < batch_size:
      examples.append(pack_example(
          empty, [], num_prompts=num_prompts, num_slots=num_slots, config=task_config,
          with_masks=masks, detection_boxes=np.zeros((0, 4), np.float32) if detection else None))
      names.append("padding")
    metas = [(r, s, slot.meta) for r, (_, _, row, _, _) in enumerate(pending)
             for s, slot in enumerate(row)]
    return stack_examples(examples, names), metas

  for index in range(len(data_source)):
    source_record = data_source[index]
    record = tasks.base.without_features(source_record, tasks.get(task_name).unread_features)
    valid_hw = None
    if canvas_size is not None:
      record, valid_hw = augment_lib.transform_record(record, tasks.get(task_name),
                                                      canvas=canvas_size, augment=None,
                                                      train=False)
    slots = tasks.make_slots(task_name, record, tokenizer, task_config)
    image = np.asarray(record["image"])
    boxes = detection_boxes(task_name, record, detection)
    for row in rows_of_slots(slots, num_slots, num_prompts):
      pending.append((_record_name(task_name, index, source_record), image, row, valid_hw,
                      boxes))
      if len(pending) == batch_size:
        yield flush()
        pending = []
  if pending:
    yield flush()
