"""What every task shares: the `Task` record, caption slots, text lengths, evaluation context.

A `Task` (one per task, registered in `pixelllm_jax/tasks/__init__.py`) holds
everything the library needs to know about it:
- `builder`: the tfds builder that feeds it by default (docs/DATA_FORMATS.md);
- `make_slots`: builder record -> caption slots (prompt, text prompt, target
  and its supervision), deterministic (no sampling);
- `instruction`: the default text prompt ("where is", ...);
- `move_annotations` and `official_augment`: how a crop / flip / resize moves
  the record's annotations (`data/augment.py`), and the official training
  augmentation of its dataset;
- `point_loss`: whether its slots supervise the localization head (point L1,
  the optional GIoU term and the per-task `point_l1/<task>` metric);
- `mask_loss`: whether its slots carry a target mask (`Slot.mask`) that
  supervises the mask head; batches of such a task carry `mask_targets`;
- `evaluate`: its held-out evaluation, writing predictions and pictures;
- `detection_boxes`: record -> float32[G, 4], every ground-truth box of the
  image (after augmentation), for tasks that train the box decoder (dense
  captioning); batches of such a task carry `det_boxes` / `det_valid`;
- `unread_features`: features of its builder's records that it never reads
  (paths such as 'objects/mask'): its data source leaves them encoded and the
  pipeline drops them before augmentation, so they cost neither a decode nor
  a resample (refer's per-object PNG masks: the box tasks skip them, a mask
  task reading the same builder lists nothing).

A `Slot` is one (location prompt, text prompt, target caption) triple with its
supervision, already aligned as `pixelllm_jax/batch.py` requires:
- `target` ends with EOS; an overlong caption is truncated to `max_target_len`
  *keeping* its EOS (the official code can lose it).
- `loss_weights` follow decoder *target* positions (t5x); `point_targets` and
  `point_weights` follow decoder *input* positions: the location of target
  token t_j sits at input position j + 1, where t_j is fed.
- `mask` (mask tasks only) is the target on the record's image as packed:
  the padded canvas when there is one (pixels outside the image are False).
Coordinates are normalized [0, 1] xy, boxes xyxy.
"""
import dataclasses
import json
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np

FULL_IMAGE_BOX = np.array([0.0, 0.0, 1.0, 1.0], np.float32)


class TextEncoder(Protocol):
  eos_id: int

  def encode(self, text: str) -> list[int]:
    ...


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Lengths and text prompts shared by every task.

  max_target_len: L, decoder length (target tokens incl. EOS).
  max_context_len: Lc, encoder text-prompt length (incl. EOS).
  points_per_token: P; 2 = box corners (TL, BR), 1 = one point (trace:
    time-averaged trace point; refer: box centre).
  instructions: (task, text prompt) overrides of the tasks' own instructions.
  max_detection_boxes: G, ground-truth boxes per image a detection task's batch
    carries (official densecap: 100, `max_boxes`); an image's boxes beyond G are
    dropped in record order, as the official padding truncates them.
  """
  max_target_len: int = 128
  max_context_len: int = 32
  points_per_token: int = 2
  instructions: tuple[tuple[str, str], ...] = ()
  max_detection_boxes: int = 100

  def __post_init__(self):
    if self.points_per_token not in (1, 2):
      raise ValueError(f"points_per_token must be 1 or 2, got {self.points_per_token}")
    if self.max_target_len < 1 or self.max_context_len < 1 or self.max_detection_boxes < 1:
      raise ValueError(f"lengths must be >= 1: {self}")
    object.__setattr__(self, "instructions", tuple((str(t), str(i)) for t, i in self.instructions))

  def instruction(self, task: "Task") -> str:
    return dict(self.instructions).get(task.name, task.instruction)


@dataclasses.dataclass(frozen=True, eq=False)
class Slot:
  """One caption slot. L = max_target_len, P = points_per_token."""
  task: str
  prompt_box: np.ndarray     # float32[4] xyxy
  context: np.ndarray        # int32[<= Lc], ends with EOS
  target: np.ndarray         # int32[<= L], ends with EOS
  loss_weights: np.ndarray   # float32[L], over decoder target positions
  point_targets: np.ndarray  # float32[L, P, 2], over decoder input positions
  point_weights: np.ndarray  # float32[L], over decoder input positions
  meta: dict[str, Any]       # what evaluation needs (references, ids, gt boxes)
  mask: np.ndarray | None = None  # bool[H, W] on the packed image (mask tasks), else None


@dataclasses.dataclass
class EvalContext:
  """What a task's evaluation gets besides its batches.

  teacher_forced(batch) / generate(batch) -> `model.Predictions` of one numpy
    batch as numpy arrays (jitted and sharded by the caller): the model read
    along the given targets, or decoding greedily with the KV cache.
  scenes: image_id -> generated-world scene ground truth (empty for real data).
  dense_caption(batch) -> `model.Predictions` of the model's own detections, each
    captioned (`boxes`, `scores`, `valid`, `tokens` per detection), for models
    with a box decoder; None otherwise.
  """
  teacher_forced: Callable[[dict], Any]
  generate: Callable[[dict], Any]
  tokenizer: Any
  out_dir: str
  num_visualizations: int
  scenes: Mapping[Any, dict] = dataclasses.field(default_factory=dict)
  dense_caption: Callable[[dict], Any] | None = None


Batches = Iterable[tuple[dict[str, np.ndarray], list[tuple[int, int, dict]]]]
SlotFn = Callable[[dict, TextEncoder, TaskConfig], list[Slot]]
MoveFn = Callable[..., dict]
EvalFn = Callable[[EvalContext, Batches], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of the model (module docstring)."""
  name: str
  builder: str
  instruction: str
  make_slots: SlotFn
  move_annotations: MoveFn
  official_augment: Any  # data.augment.AugmentConfig
  point_loss: bool
  evaluate: EvalFn
  unread_features: tuple[str, ...] = ()
  mask_loss: bool = False
  detection_boxes: Callable[[dict], np.ndarray] | None = None

  @property
  def detection(self) -> bool:
    """Whether the task trains the box decoder (its batches carry detection targets)."""
    return self.detection_boxes is not None


def without_features(record: dict, paths: Iterable[str]) -> dict:
  """`record` less the features at `paths` ('objects/mask': key 'mask' of the
  dict under 'objects'); copies only the dicts on those paths, absent ones are
  no error."""
  out = dict(record)
  for path in paths:
    *parents, leaf = path.split("/")
    node = out
    for key in parents:
      if not isinstance(node.get(key), dict):
        break
      child = node[key] = dict(node[key])
      node = child
    else:
      node.pop(leaf, None)
  return out


def text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def encode_with_eos(tokenizer: TextEncoder, text_: str, max_len: int) -> np.ndarray:
  """int32[<= max_len]: ids of `text_`, truncated to leave room for EOS, + EOS."""
  ids = list(tokenizer.encode(text_))[: max_len - 1]
  return np.asarray(ids + [tokenizer.eos_id], np.int32)


def context_tokens(task: Task, tokenizer: TextEncoder, config: TaskConfig,
                   suffix: str = "") -> np.ndarray:
  """The encoder's text prompt: the task's instruction (+ " " + suffix) + EOS."""
  prompt = config.instruction(task)
  return encode_with_eos(tokenizer, f"{prompt} {suffix}" if suffix else prompt,
                         config.max_context_len)


def text_slot(task: str, prompt_box, context, target, config: TaskConfig,
              meta: dict, *, text_loss: bool = True) -> Slot:
  """A slot with no localization supervision (points filled in by callers)."""
  length, p = config.max_target_len, config.points_per_token
  loss_weights = np.zeros(length, np.float32)
  if text_loss:
    loss_weights[: len(target)] = 1.0
  return Slot(task=task, prompt_box=np.asarray(prompt_box, np.float32), context=context,
              target=target, loss_weights=loss_weights,
              point_targets=np.zeros((length, p, 2), np.float32),
              point_weights=np.zeros(length, np.float32), meta=meta)


def box_points(box_4: np.ndarray, points_per_token: int) -> np.ndarray:
  """float32[P, 2]: corners (TL, BR) for P = 2, the centre for P = 1."""
  box_4 = np.clip(np.asarray(box_4, np.float32), 0.0, 1.0)
  corners = box_4.reshape(2, 2)
  return corners if points_per_token == 2 else corners.mean(0, keepdims=True)


def image_id(meta: dict) -> int | str | None:
  """A record's image id: an int when numeric (COCO, the world), else the
  string (Open Images ids are hex strings)."""
  value = meta.get("image_id")
  if isinstance(value, bytes):
    value = value.decode()
  if isinstance(value, str) and not value.isdigit():
    return value
  return None if value is None else int(value)


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
  """One JSON object per line (numpy values converted)."""
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
              + "\n")
