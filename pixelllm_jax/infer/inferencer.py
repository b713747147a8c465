"""One request -> the model's answer, in the pixels of the user's image.

The steps, each the one evaluation uses:
1. The image (any size, any format PIL reads; EXIF orientation applied, converted to RGB) is
   put on the model's square canvas as evaluation puts a record (`augment.transform_record`
   with no augmentation: long side = canvas, padded bottom/right; `image_valid_hw` says how
   much is image).
2. The request's prompt becomes the task's slot (requests.PROMPTS): a full-image or region
   prompt box and the task's instruction (`tasks.base.context_tokens`, so a run's
   `TaskConfig.instructions` apply), or for an expression "<instruction> <expression>" with
   the expression as target, exactly as the tasks' `make_slots` build them; then packed as
   the pipeline packs slots (`pipeline.pack_example`, one slot, one prompt).
3. `model.predict`: greedy decoding for generated answers, teacher forcing for an
   expression (the box read where it ends, as refer's evaluation); for refseg also the mask.
   densecap: `model.dense_caption`, the model's own detections each captioned (models with
   a box decoder); the answer lists them as `regions` (box, score, text, words) by
   descending score, and its `words` are all the regions' words.
4. Coordinates come back normalized to the image, which the canvas holds whole (no crop),
   so pixel = normalized x (width, height) of the original image; boxes and points are
   clipped into it (as refer's evaluation clips its boxes). A mask is upsampled to the
   canvas, cropped to the image and resized to the original size
   (`metrics.segmentation.logits_to_mask`), then written as COCO RLE.

Words: sentencepiece pieces joined into words (a piece starting with '\u2581' starts one); a
word's point is the mean of its pieces' points (of each piece's P points), and with two points
per token its box is the mean of its pieces' corners. Scores: `log_likelihood`, the sum of
the log-probabilities of a generated answer's tokens (EOS included) and its mean per token;
`mask_iou`, the mask head's own IoU estimate (refseg).
"""
import dataclasses
import types
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pixelllm_jax import tasks
from pixelllm_jax.batch import EOS_ID, PAD_ID, Batch, shift_right
from pixelllm_jax.data import augment, pipeline
from pixelllm_jax.infer import requests as requests_lib
from pixelllm_jax.infer.loading import Loaded
from pixelllm_jax.infer.requests import Request, RequestError
from pixelllm_jax.metrics import boxes as box_lib, segmentation
from pixelllm_jax.model import DecodeSettings
from pixelllm_jax.tasks import base

WORD_START = "\u2581"
# `augment.transform_record` moves a record's annotations with its task's `move_annotations`;
# an inference record holds only the image, and evaluation's resize moves nothing anyway.
_IMAGE_ONLY = types.SimpleNamespace(move_annotations=lambda record, *unused: dict(record))


@dataclasses.dataclass
class Answer:
  """`json`: what is written (module docstring); `image` uint8[H, W, 3] the original image;
  `mask` bool[H, W] or None."""
  json: dict[str, Any]
  image: np.ndarray
  mask: np.ndarray | None = None


def read_image(request: Request) -> np.ndarray:
  """uint8[H, W, 3] of the request's image file; RequestError naming the request."""
  try:
    with Image.open(request.image) as image:
      return pixels_of(image)
  except FileNotFoundError as e:
    raise RequestError(f"{request.name}: image file not found: {request.image}") from e
  except IsADirectoryError as e:
    raise RequestError(f"{request.name}: {request.image} is a folder, not an image") from e
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise RequestError(f"{request.name}: cannot read the image {request.image}: {e}") from e


def pixels_of(image: Image.Image) -> np.ndarray:
  """uint8[H, W, 3]: the image upright (EXIF orientation) in RGB (alpha dropped)."""
  image = ImageOps.exif_transpose(image)
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey: RGB would clip
    grey = np.clip(np.nan_to_num(np.asarray(image, np.float64)), 0, None)
    top = float(grey.max()) or 1.0
    image = Image.fromarray((grey / top * 255).round().astype(np.uint8))
  return np.ascontiguousarray(np.asarray(image.convert("RGB"), np.uint8))


def to_canvas(pixels: np.ndarray, canvas_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8[S, S, 3] canvas, float32[2] image_valid_hw): evaluation's resize and pad."""
  record, valid_hw = augment.transform_record({"image": pixels}, _IMAGE_ONLY, canvas=canvas_size,
                                              augment=None, train=False)
  return record["image"], valid_hw


def make_slot(task_name: str, prompt_box: np.ndarray, expression: str | None,
              tokenizer: base.TextEncoder, config: base.TaskConfig) -> base.Slot:
  """The task's slot for a prompt box (normalized xyxy) and, for an expression task, its
  expression (module docstring, step 2)."""
  task = tasks.get(task_name)
  if requests_lib.PROMPTS[task_name] == "expression":
    context = base.context_tokens(task, tokenizer, config, expression)
    target = base.encode_with_eos(tokenizer, expression, config.max_target_len)
  else:
    context = base.context_tokens(task, tokenizer, config)
    target = np.asarray([tokenizer.eos_id], np.int32)  # the answer is generated
  return base.text_slot(task_name, prompt_box, context, target, config, {})


def words_of(ids: np.ndarray, points_TxPx2: np.ndarray, tokenizer) -> list[dict[str, Any]]:
  """Words of a token row (up to EOS) with their normalized points (module docstring)."""
  groups: list[list[int]] = []
  for t, token in enumerate(np.asarray(ids).tolist()):
    if token == EOS_ID:
      break
    if token == PAD_ID or not 0 <= token < tokenizer.num_pieces:
      continue
    if not groups or tokenizer.piece(token).startswith(WORD_START):
      groups.append([])
    groups[-1].append(t)
  words = []
  for group in groups:
    text = tokenizer.decode([int(ids[t]) for t in group]).strip()
    if not text:
      continue
    corners = np.asarray(points_TxPx2, np.float64)[group].mean(0)  # [P, 2]
    word = {"text": text, "point": corners.mean(0), "token_ids": [int(ids[t]) for t in group]}
    if len(corners) == 2:
      word["box"] = np.concatenate([corners.min(0), corners.max(0)])
    words.append(word)
  return words


class Inferencer:
  """Answers requests with a loaded model (module docstring); compiles on first use, once
  per decoding mode (every request has the same shapes)."""

  def __init__(self, loaded: Loaded, max_decode_len: int | None = None, beam_size: int = 1,
               alpha: float = 0.6):
    """Generated answers decode greedily, or with beam search when `beam_size` > 1 (`alpha`:
    its brevity penalty; the official captioning setting is beam 4, alpha 0.6)."""
    self.loaded = loaded
    self.canvas_size = loaded.model.config.image_size
    self.has_masks = getattr(loaded.model.config, "mask_head", None) is not None
    self.has_boxes = getattr(loaded.model.config, "box_head", None) is not None
    partitioner, model = loaded.partitioner, loaded.model
    max_len = max_decode_len or loaded.task_config.max_target_len
    generate = (DecodeSettings(mode="greedy", max_len=max_len) if beam_size == 1 else
                DecodeSettings(mode="beam", max_len=max_len, beam_size=beam_size, alpha=alpha))
    self._predict = {
        mode: partitioner.jit(lambda p, b, s=settings: model.predict(p, b, s))
        for mode, settings in (("greedy", generate),
                               ("teacher_forced", DecodeSettings(mode="teacher_forced")))}
    self._score = partitioner.jit(model.score)
    self._dense = partitioner.jit(lambda p, b: model.dense_caption(p, b, generate))

  def _device(self, batch: Batch) -> Batch:
    return self.loaded.partitioner.shard_batch(batch)

  def predict(self, batch: Batch, mode: str) -> Any:
    """`model.predict` of a numpy batch, as numpy arrays: mode 'greedy' generates (greedy or
    beam search, as the Inferencer was made), 'teacher_forced' reads the batch's targets."""
    return jax.device_get(self._predict[mode](self.loaded.params, self._device(batch)))

  def answer(self, request: Request, pixels: np.ndarray | None = None) -> Answer:
    """The answer to `request` (its image read from disk unless `pixels` uint8[H, W, 3] is
    given). RequestError, naming the request, when it cannot be answered."""
    kind = requests_lib.check_task(request)
    if request.task == "refseg" and not self.has_masks:
      raise RequestError(f"{request.name}: masks are not available in this model (it has no "
                         "mask head: PixelLLMConfig.mask_head is not set); task 'refer' gives "
                         "the referred box")
    if request.task == "densecap" and not self.has_boxes:
      raise RequestError(f"{request.name}: dense captioning is not available in this model (it "
                         "has no box decoder: PixelLLMConfig.box_head is not set); task 'loca' "
                         "captions a region you give")
    pixels = read_image(request) if pixels is None else pixels
    height, width = pixels.shape[:2]
    requests_lib.check_geometry(request, width, height)
    scale = np.array([width, height, width, height], np.float64)
    if request.box is not None:
      prompt_box = np.asarray(request.box, np.float64) / scale
    elif request.point is not None:  # a point is a box of size zero at it
      prompt_box = np.tile(np.asarray(request.point, np.float64), 2) / scale
    else:
      prompt_box = base.FULL_IMAGE_BOX
    canvas, valid_hw = to_canvas(pixels, self.canvas_size)
    config = self.loaded.task_config
    slot = make_slot(request.task, prompt_box, request.expression, self.loaded.tokenizer, config)
    masks = {"with_masks": True} if getattr(tasks.get(request.task), "mask_loss", False) else {}
    example = pipeline.pack_example(canvas, [slot], num_prompts=1, num_slots=1, config=config,
                                    image_valid_hw=valid_hw, **masks)
    batch = Batch(**pipeline.stack_examples([example], [request.name]))
    if request.task == "densecap":
      return self._dense_answer(request, batch, pixels, valid_hw)
    pred = self.predict(batch, "teacher_forced" if kind == "expression" else "greedy")
    tokens, points = np.asarray(pred.tokens[0, 0]), np.asarray(pred.points[0, 0])

    words = words_of(tokens, points, self.loaded.tokenizer)
    for word in words:
      word["point"] = _pixels(word["point"], width, height)
      if "box" in word:
        word["box"] = _pixels(word["box"], width, height)
    out = self._answer_json(request, width, height, valid_hw,
                            self.loaded.tokenizer.decode(tokens.tolist()), words)
    mask = None
    if kind == "expression":
      out["box"] = _pixels(box_lib.clip_to_image(pred.boxes[0, 0]), width, height)
    else:
      scored = batch.replace(decoder_target_tokens=pred.tokens,
                             decoder_input_tokens=shift_right(np.asarray(pred.tokens)))
      log_likelihood = float(jax.device_get(
          self._score(self.loaded.params, self._device(scored)))[0, 0])
      count = int(np.sum(tokens > 0))
      out["scores"] = {"log_likelihood": log_likelihood,
                       "mean_token_log_likelihood": log_likelihood / max(count, 1)}
    if request.task == "refseg":
      mask_logits = getattr(pred, "mask_logits", None)
      if mask_logits is None:
        raise RequestError(f"{request.name}: masks are not available in this model (its "
                           "predictions carry no mask)")
      mask = segmentation.logits_to_mask(np.asarray(mask_logits[0, 0]), canvas.shape[:2],
                                         valid_hw, (height, width))
      out["mask"] = segmentation.encode_rle(mask)
      out["scores"]["mask_iou"] = float(np.asarray(pred.mask_iou)[0, 0])
    return Answer(json=out, image=pixels, mask=mask)


  def _answer_json(self, request: Request, width: int, height: int, valid_hw, text: str,
                   words: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "request": request.name, "image": request.image, "image_size": [width, height],
        "task": request.task, "prompt": {k: v for k, v in request.as_json().items()
                                         if k in ("box", "point", "expression")},
        "text": text, "words": words, "scores": {},
        "checkpoint": {"path": self.loaded.source, "step": self.loaded.step},
        "canvas": {"size": self.canvas_size,
                   "image_hw": list(segmentation.valid_extent(
                       valid_hw, (self.canvas_size, self.canvas_size)))},
    }

  def _dense_answer(self, request: Request, batch: Batch, pixels: np.ndarray,
                    valid_hw) -> Answer:
    """densecap: every detection with its caption (module docstring, step 3)."""
    height, width = pixels.shape[:2]
    pred = jax.device_get(self._dense(self.loaded.params, self._device(batch)))
    valid = np.asarray(pred.valid[0], bool)
    order = [int(i) for i in np.argsort(-np.asarray(pred.scores[0]), kind="stable") if valid[i]]
    regions, all_words = [], []
    for rank, d in enumerate(order):
      tokens = np.asarray(pred.tokens[0, d])
      words = words_of(tokens, np.asarray(pred.points[0, d]), self.loaded.tokenizer)
      for word in words:
        word["point"] = _pixels(word["point"], width, height)
        if "box" in word:
          word["box"] = _pixels(word["box"], width, height)
        word["region"] = rank
      all_words.extend(words)
      regions.append({"box": _pixels(box_lib.clip_to_image(pred.boxes[0, d]), width, height),
                      "score": float(pred.scores[0, d]),
                      "text": self.loaded.tokenizer.decode(tokens.tolist()), "words": words})
    out = self._answer_json(request, width, height, valid_hw,
                            regions[0]["text"] if regions else "", all_words)
    out["regions"] = regions
    return Answer(json=out, image=pixels)


def _pixels(normalized: np.ndarray, width: int, height: int) -> list[float]:
  """Normalized xy / xyxy, clipped into the image, as pixel coordinates."""
  normalized = np.clip(np.asarray(normalized, np.float64), 0.0, 1.0)
  scale = np.tile([width, height], len(normalized) // 2)
  return [float(v) for v in normalized * scale]
