"""Canvas resize/pad and seeded training augmentation of builder records.

Augmentation works on the decoded *record* (docs/DATA_FORMATS.md), before the
slot functions of `pixelllm_jax/tasks/` tokenize anything. Every slot is then built from
the augmented record, so prompts, contexts ("where is <expr>"), targets and
localization targets stay in step by construction: an object or region that
the crop removes takes its expressions/phrase with it, and a flip swaps
left/right words in the text the contexts and targets are encoded from.
This fixes the official faults (docs/DESIGN.md, "Official code"): crops that drop
boxes but keep their contexts, flips that do not swap left/right, unseeded
random ops.

The chain per record (`transform_record`), all draws from one numpy Generator
that the pipeline seeds with (seed, shard, global example index):

1. Resize, keeping the aspect ratio:
   - augmentation (official `random_ratio_resize(min, max, canvas)`, an
     EfficientDet-style large-scale jitter): ratio ~ U(min_scale, max_scale),
     s = int(canvas * ratio), then DETR's `get_size_with_aspect_ratio(size=s,
     max_size=s)`: the short side aims at s, but the long side may not exceed
     s, so the short side becomes round(s * short / long) and the long side
     int(short' * long / short), i.e. the image is scaled so that its *long*
     side is ~s. That integer arithmetic can overshoot s by < long/short/2
     pixels; we clamp both sides to s (a documented deviation, so that scale
     1.0 always fits the canvas, as the official LN setting intends);
   - evaluation (`train=False`): the same with s = canvas (official ref/VG
     eval "long side 384"; LN eval `resize_shorter(384, max 384)` is the same);
   - training without augmentation: only shrink, so that the long side is at
     most the canvas (smaller images keep their size).
2. Crop (augmentation with `crop`): DETR `fixed_size_crop(canvas)`: a random
   window of min(h, canvas) x min(w, canvas) at a uniform integer offset. An
   object / region whose box, clipped to the window, collapses or keeps less
   than `min_visible_fraction` of its area is dropped with everything that
   refers to it (its expressions, phrase, mask). Trace utterances whose
   time-averaged point falls outside the window, or whose box misses it, keep
   their token alignment but get point weight 0 (`utterance_in_view`); the
   rest are clipped into the window. Points and boxes are then re-normalized
   to the window.
3. Horizontal flip (augmentation with `flip`, probability `flip_prob`): the
   image, masks and every x (x -> 1 - x; boxes x0' = 1 - x1, x1' = 1 - x0) are
   mirrored and `swap_left_right` rewrites every text of the record
   (expressions, region phrases, captions, utterances).
4. Pad bottom/right to the square canvas; `valid_hw` = the fraction of the
   canvas (h, w) the image covers.

Coordinates stay normalized to the unpadded (resized, cropped) image, so a pure
resize + pad leaves every coordinate bit-identical. Pixels are resampled by
PIL (bilinear; masks nearest) straight from the source window (`resize(box=)`),
which equals resize-then-crop but never materializes a 2x-upscaled image.
"""
import dataclasses
import re
from typing import NamedTuple

import numpy as np
from PIL import Image

from pixelllm_jax.data import trace

# The one list of mirrored words; each pair is swapped both ways, case kept.
LEFT_RIGHT_WORDS = (
    ("left", "right"),
    ("leftmost", "rightmost"),
    ("lefthand", "righthand"),
    ("leftward", "rightward"),
    ("leftwards", "rightwards"),
)
_SWAP = {a: b for pair in LEFT_RIGHT_WORDS for a, b in (pair, pair[::-1])}
_SWAP_RE = re.compile(r"\b(" + "|".join(sorted(_SWAP, key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)


def _swap_word(match: re.Match) -> str:
  word = match.group(0)
  out = _SWAP[word.lower()]
  if word.isupper() and len(word) > 1:
    return out.upper()
  return out.capitalize() if word[0].isupper() else out


def swap_left_right(text):
  """`text` (str or bytes) with the words of LEFT_RIGHT_WORDS mirrored ("left-hand" too)."""
  if isinstance(text, bytes):
    return _SWAP_RE.sub(_swap_word, text.decode("utf-8")).encode("utf-8")
  return _SWAP_RE.sub(_swap_word, str(text))


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation of one source (module docstring). Defaults: scale 1."""
  min_scale: float = 1.0
  max_scale: float = 1.0
  crop: bool = False
  flip: bool = False
  flip_prob: float = 0.5
  min_visible_fraction: float = 0.25  # of a box's area, after the crop

  def __post_init__(self):
    if not 0 < self.min_scale <= self.max_scale:
      raise ValueError(f"need 0 < min_scale <= max_scale: {self}")
    if self.max_scale > 1 and not self.crop:
      raise ValueError(f"max_scale > 1 needs crop=True (the image would exceed the canvas): {self}")
    if not 0 <= self.flip_prob <= 1 or not 0 <= self.min_visible_fraction <= 1:
      raise ValueError(f"flip_prob and min_visible_fraction must be in [0, 1]: {self}")


class Params(NamedTuple):
  """One draw: resize (h, w) -> window (top, left, height, width) -> flip."""
  resized_hw: tuple[int, int]
  window: tuple[int, int, int, int]
  flip: bool


def scaled_size(h: int, w: int, size: int) -> tuple[int, int]:
  """DETR get_size_with_aspect_ratio(size, max_size=size), sides clamped to <= size."""
  short, long = min(h, w), max(h, w)
  target = size
  if long / short * target > size:
    target = int(round(size * short / long))
  if short == target:
    oh, ow = h, w
  elif w < h:
    ow, oh = target, int(target * h / w)
  else:
    oh, ow = target, int(target * w / h)
  return max(1, min(oh, size)), max(1, min(ow, size))


def sample_params(h: int, w: int, canvas: int, augment: AugmentConfig | None, *,
                  train: bool, rng: np.random.Generator | None = None) -> Params:
  """The resize, crop window and flip for an h x w image (module docstring)."""
  if augment is None:
    if train and max(h, w) <= canvas:
      return Params((h, w), (0, 0, h, w), False)
    nh, nw = scaled_size(h, w, canvas)
    return Params((nh, nw), (0, 0, nh, nw), False)
  ratio = rng.uniform(augment.min_scale, augment.max_scale)
  nh, nw = scaled_size(h, w, max(1, int(canvas * ratio)))
  top, left, ch, cw = 0, 0, nh, nw
  if augment.crop:
    ch, cw = min(nh, canvas), min(nw, canvas)
    top = int(rng.integers(0, nh - ch + 1))
    left = int(rng.integers(0, nw - cw + 1))
  flip = bool(augment.flip and rng.random() < augment.flip_prob)
  return Params((nh, nw), (top, left, ch, cw), flip)


def _resample(array: np.ndarray, params: Params, resample) -> np.ndarray:
  """Resize + crop (+ flip) of an [H, W, C] uint8 array, in one PIL call."""
  h, w = array.shape[:2]
  (nh, nw), (top, left, ch, cw) = params.resized_hw, params.window
  if (nh, nw) != (h, w) or (ch, cw) != (h, w):
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    squeeze = array.shape[-1] == 1
    image = Image.fromarray(array[..., 0] if squeeze else array)
    array = np.asarray(image.resize((cw, ch), resample, box=box))
    if squeeze:
      array = array[..., None]
  if params.flip:
    array = array[:, ::-1]
  return np.ascontiguousarray(array)


class _Coords:
  """Normalized coordinates of the source image -> of the window (and flipped)."""

  def __init__(self, params: Params):
    (nh, nw), (top, left, ch, cw) = params.resized_hw, params.window
    self.cropped = (top, left, ch, cw) != (0, 0, nh, nw)
    self.identity = not self.cropped and not params.flip
    self.sx, self.ox = nw / cw, left / cw
    self.sy, self.oy = nh / ch, top / ch
    self.flip = params.flip

  def points(self, xy: np.ndarray) -> np.ndarray:
    """float32[..., 2], not clipped."""
    xy = np.asarray(xy, np.float32)
    if self.identity:
      return xy
    x = xy[..., 0] * self.sx - self.ox
    y = xy[..., 1] * self.sy - self.oy
    return np.stack([1 - x if self.flip else x, y], -1).astype(np.float32)

  def boxes(self, boxes: np.ndarray) -> np.ndarray:
    """float32[..., 4] xyxy, not clipped (a flip swaps x0 and x1)."""
    boxes = np.asarray(boxes, np.float32)
    if self.identity:
      return boxes
    corners = self.points(boxes.reshape(*boxes.shape[:-1], 2, 2))
    lo, hi = np.minimum(corners[..., 0, :], corners[..., 1, :]), np.maximum(
        corners[..., 0, :], corners[..., 1, :])
    return np.concatenate([lo, hi], -1).astype(np.float32)


def _clip_and_keep(boxes: np.ndarray, min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(boxes clipped to [0, 1], bool keep): kept = not collapsed and enough area left."""
  clipped = np.clip(boxes, 0.0, 1.0)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  kept_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
  keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  keep &= kept_area >= min_fraction * area
  return clipped, keep


def _move_boxes(boxes, coords: _Coords, min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(moved boxes float32[M, 4], bool[M] keep); only a crop clips boxes or drops any."""
  moved = coords.boxes(np.asarray(boxes, np.float32).reshape(-1, 4))
  if not coords.cropped:
    return moved, np.ones(len(moved), bool)
  return _clip_and_keep(moved, min_fraction)


def _select(values, keep: np.ndarray):
  if isinstance(values, np.ndarray):
    return values[keep]
  return [v for v, k in zip(values, keep) if k]


def _texts(values, flip: bool):
  return [swap_left_right(v) for v in values] if flip else values


def _fields(table: dict, keep: np.ndarray) -> dict:
  return {k: _select(v if isinstance(v, np.ndarray) else list(v), keep) for k, v in table.items()}


def move_objects(record: dict, coords: _Coords, params: Params, min_fraction: float) -> dict:
  """A referring record: objects (boxes, masks) moved, dropped ones take their expressions."""
  objects = dict(record["objects"])
  objects["box"], keep = _move_boxes(objects["box"], coords, min_fraction)
  objects = _fields(objects, keep)
  if "mask" in objects:
    objects["mask"] = [_resample(np.asarray(m), params, Image.NEAREST) for m in objects["mask"]]
  expressions = dict(record["expressions"])
  object_index = np.asarray(expressions["object_index"], np.int64).reshape(-1)
  expression_keep = keep[object_index]
  expressions = _fields(expressions, expression_keep)
  expressions["object_index"] = (np.cumsum(keep) - 1)[object_index[expression_keep]]
  expressions["text"] = _texts(expressions["text"], params.flip)
  return {**record, "objects": objects, "expressions": expressions}


def move_regions(record: dict, coords: _Coords, params: Params, min_fraction: float) -> dict:
  """A region-caption record: region boxes moved, dropped ones take their phrases."""
  regions = dict(record["regions"])
  regions["box"], keep = _move_boxes(regions["box"], coords, min_fraction)
  regions = _fields(regions, keep)
  regions["phrase"] = _texts(regions["phrase"], params.flip)
  return {**record, "regions": regions}


def move_narrative(record: dict, coords: _Coords, params: Params, min_fraction: float) -> dict:
  """A narrative / caption record: captions flipped, utterance points and boxes moved
  (`min_fraction` unused: utterances are never dropped, only marked out of view)."""
  del min_fraction
  out = dict(record)
  if "caption" in record:
    caption = record["caption"]
    if isinstance(caption, (bytes, str)):
      out["caption"] = swap_left_right(caption) if params.flip else caption
    else:
      out["caption"] = _texts(list(caption), params.flip)
  if "utterances" not in record:
    return out
  valid = trace.utterance_valid(record)  # decided on the source, before coordinates move
  num = len(valid)
  boxes = coords.boxes(np.asarray(record["utterance_boxes"], np.float32).reshape(num, 4))
  points = coords.points(np.asarray(record["utterance_points"], np.float32).reshape(num, 2))
  inside = ((points >= 0) & (points <= 1)).all(-1)
  hits = (boxes[:, 2] >= 0) & (boxes[:, 0] <= 1) & (boxes[:, 3] >= 0) & (boxes[:, 1] <= 1)
  in_view = np.asarray(record.get("utterance_in_view", np.ones(num, bool)), bool)
  out["utterance_valid"] = valid
  out["utterance_in_view"] = in_view & (coords.identity | (inside & hits))
  out["utterance_boxes"] = np.clip(boxes, 0.0, 1.0) if not coords.identity else boxes
  out["utterance_points"] = np.clip(points, 0.0, 1.0) if not coords.identity else points
  out["utterances"] = _texts(list(record["utterances"]), params.flip)
  if "trace" in record:
    trace_Tx3 = np.asarray(record["trace"], np.float32).reshape(-1, 3)
    out["trace"] = np.concatenate([coords.points(trace_Tx3[:, :2]), trace_Tx3[:, 2:]], -1)
  return out


def transform_record(record: dict, task, *, canvas: int, augment: AugmentConfig | None,
                     train: bool, rng: np.random.Generator | None = None
                     ) -> tuple[dict, np.ndarray]:
  """(record with its image on the canvas and annotations moved, valid_hw float32[2]).

  `task` is the record's `tasks.Task` (its `move_annotations` moves the
  annotations). Draws `sample_params` from `rng` (needed with `augment`) and
  applies them.
  """
  h, w = np.shape(record["image"])[:2]
  params = sample_params(h, w, canvas, augment, train=train, rng=rng)
  min_fraction = augment.min_visible_fraction if augment is not None else 0.0
  return apply_params(record, task, params, canvas=canvas, min_visible_fraction=min_fraction)


def apply_params(record: dict, task, params: Params, *, canvas: int,
                 min_visible_fraction: float = 0.0) -> tuple[dict, np.ndarray]:
  """`transform_record` for a given draw. The returned record's `image` is
  uint8[canvas, canvas, 3] (padded bottom/right); its coordinates are
  normalized to the unpadded part, whose size (h, w) / canvas is valid_hw."""
  pixels = _resample(np.asarray(record["image"]), params, Image.BILINEAR)
  ch, cw = pixels.shape[:2]
  if ch > canvas or cw > canvas:
    raise ValueError(f"window {ch}x{cw} exceeds the canvas {canvas}: {params}")
  padded = np.zeros((canvas, canvas, 3), np.uint8)
  padded[:ch, :cw] = pixels
  out = task.move_annotations(record, _Coords(params), params, min_visible_fraction)
  out["image"] = padded
  return out, np.array([ch / canvas, cw / canvas], np.float32)
