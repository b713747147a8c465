"""Builder records -> caption slots, one function per task (DESIGN.md section 2).

A `Slot` is one (location prompt, text prompt, target caption) triple with its
supervision, already aligned as `pixelllm_jax/batch.py` requires:

- `target` ends with EOS; an overlong caption is truncated to `max_target_len`
  *keeping* its EOS (the official code can lose it, official-pixelllm.md 5.4).
- `loss_weights` follow decoder *target* positions (t5x); `point_targets` and
  `point_weights` follow decoder *input* positions: the location of target
  token t_j sits at input position j + 1, where t_j is fed.
- Referring: the box sits at the one input position whose target is EOS (the
  hidden state that has just read the last word), text loss off, as the
  official referring training (official-pixelllm.md 3.2).
- Trace: each token gets a timed utterance by relative position
  (`trace.assign_utterances_to_tokens`), computed over the *whole* narrative
  before truncation, so a truncated narrative keeps the utterances of its own
  words instead of being stretched over all of them (a deliberate change from
  the official code, which matches after truncation).

Coordinates are normalized [0, 1] xy, boxes xyxy. Each function takes a decoded
builder record (docs/DATA_FORMATS.md), a tokenizer (`encode(str) -> list[int]`
without EOS, `eos_id`) and a `TaskConfig`; none of them samples.
Augmentation (`augment.py`) rewrites the record before these functions run;
the trace function honours its `utterance_valid` / `utterance_in_view`.
"""
import dataclasses
from typing import Any, Callable, Protocol

import gin
import numpy as np

FULL_IMAGE_BOX = np.array([0.0, 0.0, 1.0, 1.0], np.float32)

# An utterance whose time-averaged point has no coordinate above this is
# treated as missing (the official `center > 1e-5` check).
_MIN_POINT = 1e-5


class TextEncoder(Protocol):
  eos_id: int

  def encode(self, text: str) -> list[int]:
    ...


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Lengths and instructions shared by every task.

  max_target_len: L, decoder length (target tokens incl. EOS).
  max_context_len: Lc, encoder text-prompt length (incl. EOS).
  points_per_token: P; 2 = box corners (TL, BR), 1 = one point (trace:
    time-averaged trace point; refer: box centre).
  """
  max_target_len: int = 128
  max_context_len: int = 32
  points_per_token: int = 2
  caption_instruction: str = "a photo of"
  trace_instruction: str = "describe in detail"
  refer_instruction: str = "where is"
  loca_instruction: str = "an object of"

  def __post_init__(self):
    if self.points_per_token not in (1, 2):
      raise ValueError(f"points_per_token must be 1 or 2, got {self.points_per_token}")
    if self.max_target_len < 1 or self.max_context_len < 1:
      raise ValueError(f"lengths must be >= 1: {self}")


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


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def encode_with_eos(tokenizer: TextEncoder, text: str, max_len: int) -> np.ndarray:
  """int32[<= max_len]: ids of `text`, truncated to leave room for EOS, + EOS."""
  ids = list(tokenizer.encode(text))[: max_len - 1]
  return np.asarray(ids + [tokenizer.eos_id], np.int32)


def _text_slot(task: str, prompt_box, context, target, config: TaskConfig,
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


def _box_points(box_4: np.ndarray, points_per_token: int) -> np.ndarray:
  """float32[P, 2]: corners (TL, BR) for P = 2, the centre for P = 1."""
  box_4 = np.clip(np.asarray(box_4, np.float32), 0.0, 1.0)
  corners = box_4.reshape(2, 2)
  return corners if points_per_token == 2 else corners.mean(0, keepdims=True)


def caption_slots(record: dict, tokenizer: TextEncoder, config: TaskConfig) -> list[Slot]:
  """One slot per caption (`caption`: bytes, or a list of bytes): full image, text loss."""
  captions = record["caption"]
  captions = [captions] if isinstance(captions, (bytes, str)) else list(captions)
  context = encode_with_eos(tokenizer, config.caption_instruction, config.max_context_len)
  return [
      _text_slot("caption", FULL_IMAGE_BOX, context,
                 encode_with_eos(tokenizer, _text(c), config.max_target_len), config,
                 {"image_id": record.get("image_id"), "reference": _text(c)})
      for c in captions
  ]


def utterance_valid(record: dict) -> np.ndarray:
  """bool[U]: non-empty utterances whose time-averaged point is not missing.

  An augmented record carries `utterance_valid` (decided before its points
  moved: a point moved to (0, 0) by a crop is not "missing"), used as is.
  """
  if "utterance_valid" in record:
    return np.asarray(record["utterance_valid"], bool).reshape(len(record["utterances"]))
  words = [_text(u).strip() for u in record["utterances"]]
  points = np.asarray(record["utterance_points"], np.float32).reshape(len(words), 2)
  finite = np.isfinite(points).all(-1)
  return np.array([bool(w) for w in words], bool) & finite & (points.max(-1, initial=0) > _MIN_POINT)


def trace_slots(record: dict, tokenizer: TextEncoder, config: TaskConfig) -> list[Slot]:
  """One slot per narrative: full image, narrative target, per-token utterance location.

  meta["utterance_of_token"] int32[len(target)]: the utterance index of each
  target token, -1 for EOS and for tokens without a valid utterance.
  An augmented record may carry `utterance_in_view` bool[U]: utterances a crop
  left outside keep their place in the alignment but get point weight 0.
  """
  from pixelllm_jax.data import trace  # lazily: written in parallel, pure numpy

  length, p = config.max_target_len, config.points_per_token
  narrative = _text(record["caption"])
  ids = list(tokenizer.encode(narrative))
  valid = utterance_valid(record)
  if valid.any():
    utterance_of_token = np.asarray(trace.assign_utterances_to_tokens(len(ids), valid), np.int32)
  else:
    utterance_of_token = np.full(len(ids), -1, np.int32)
  ids = ids[: length - 1]
  utterance_of_token = utterance_of_token[: len(ids)]
  target = np.asarray(ids + [tokenizer.eos_id], np.int32)

  num_utterances = len(valid)
  boxes = np.asarray(record["utterance_boxes"], np.float32).reshape(num_utterances, 4)
  points = np.asarray(record["utterance_points"], np.float32).reshape(num_utterances, 2)
  context = encode_with_eos(tokenizer, config.trace_instruction, config.max_context_len)
  slot = _text_slot("trace", FULL_IMAGE_BOX, context, target, config, {
      "image_id": record.get("image_id"),
      "reference": narrative,
      "utterances": [_text(u) for u in record["utterances"]],
      "utterance_boxes": boxes,
      "utterance_points": points,
      "utterance_of_token": np.concatenate([utterance_of_token, [-1]]).astype(np.int32),
  })
  in_view = np.asarray(record.get("utterance_in_view", np.ones(len(valid), bool)), bool)
  for j, u in enumerate(utterance_of_token):
    if u < 0 or not valid[u] or not in_view[u]:
      continue
    # Target token t_j is fed at decoder input position j + 1.
    if p == 2:
      slot.point_targets[j + 1] = _box_points(boxes[u], 2)
    else:
      slot.point_targets[j + 1] = np.clip(points[u], 0.0, 1.0)[None]
    slot.point_weights[j + 1] = 1.0
  return [slot]


def refer_slots(record: dict, tokenizer: TextEncoder, config: TaskConfig) -> list[Slot]:
  """One slot per expression, in record order (none dropped).

  Context "where is <expr>" + EOS, target <expr> + EOS (teacher forced), the
  referred box at the input position whose target is EOS; no text loss.
  """
  objects, expressions = record["objects"], record["expressions"]
  boxes = np.asarray(objects["box"], np.float32).reshape(-1, 4)
  object_ids = np.asarray(objects["id"]).reshape(-1)
  texts = list(expressions["text"])
  object_index = np.asarray(expressions["object_index"], np.int64).reshape(len(texts))
  ref_ids = np.asarray(expressions["ref_id"]).reshape(len(texts))
  sent_ids = np.asarray(expressions["sent_id"]).reshape(len(texts))
  slots = []
  for i, raw in enumerate(texts):
    expression = _text(raw)
    box = boxes[object_index[i]]
    context = encode_with_eos(tokenizer, f"{config.refer_instruction} {expression}",
                              config.max_context_len)
    target = encode_with_eos(tokenizer, expression, config.max_target_len)
    slot = _text_slot("refer", FULL_IMAGE_BOX, context, target, config, {
        "image_id": record.get("image_id"),
        "ref_id": int(ref_ids[i]),
        "sent_id": int(sent_ids[i]),
        "object_id": int(object_ids[object_index[i]]),
        "expression": expression,
        "box": box.copy(),
    }, text_loss=False)
    eos_position = len(target) - 1  # decoder_target[eos_position] == EOS
    slot.point_targets[eos_position] = _box_points(box, config.points_per_token)
    slot.point_weights[eos_position] = 1.0
    slots.append(slot)
  return slots


def loca_slots(record: dict, tokenizer: TextEncoder, config: TaskConfig) -> list[Slot]:
  """One slot per region: prompt = region box, context "an object of", phrase target."""
  regions = record["regions"]
  boxes = np.asarray(regions["box"], np.float32).reshape(-1, 4)
  phrases = list(regions["phrase"])
  region_ids = np.asarray(regions["id"]).reshape(len(phrases))
  context = encode_with_eos(tokenizer, config.loca_instruction, config.max_context_len)
  return [
      _text_slot("loca", boxes[i], context,
                 encode_with_eos(tokenizer, _text(phrase), config.max_target_len), config,
                 {"image_id": record.get("image_id"), "region_id": int(region_ids[i]),
                  "reference": _text(phrase), "box": boxes[i].copy()})
      for i, phrase in enumerate(phrases)
  ]


SLOT_FNS: dict[str, Callable[[dict, TextEncoder, TaskConfig], list[Slot]]] = {
    "caption": caption_slots,
    "trace": trace_slots,
    "refer": refer_slots,
    "loca": loca_slots,
}


def make_slots(task: str, record: dict, tokenizer: TextEncoder, config: TaskConfig) -> list[Slot]:
  """All slots of `record` for `task` (one of batch.TASKS), in record order."""
  if task not in SLOT_FNS:
    raise ValueError(f"unknown task {task!r}; known: {sorted(SLOT_FNS)}")
  return SLOT_FNS[task](record, tokenizer, config)
