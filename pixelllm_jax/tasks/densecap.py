"""Dense object captioning: find the image's regions and caption each one.

Data: the GRiT-style Visual Genome dense-captioning records that location-
conditioned captioning reads (`vg_densecap` builder; the generated world's
regions). Training (official densecap config: detection + object-caption
losses):
- the box decoder (models/heads/detection.py) learns from every region box of
  the image (`detection_boxes`: batches carry `det_boxes` / `det_valid`);
- the captioner learns each drawn region's phrase from its box as the prompt,
  "an object of" instruction: loca's slots under this task's name.
  Deviation: the official model captions the ROI stage's sampled proposals
  that match a region at IoU >= 0.6 (their boxes as prompts, the region's
  caption as target); here the prompts are the regions' own boxes, so the
  caption loss does not depend on the detector's state and a step needs no
  proposal-to-prompt round trip. At test time the prompts are detections.
  Augmentation moves the regions (crop, flip, scale jitter as VG's).

Evaluation (official inference): the box decoder's detections (up to
`BoxHeadConfig.max_detections` after NMS 0.5, score >= 0.05) become the
prompts, each is captioned (the evaluation's `generation` settings: greedy by
default), and the detection score is the score. Scored with DenseCap's mAP
(metrics/densecap.py, METEOR by the COCO toolkit's jar: needs Java):
`densecap_map` (mean over IoU 0.3-0.7 x METEOR 0-0.25), `densecap_detmap`
(IoU thresholds only), `densecap_images`, `densecap_detections`. Every image's
detections go to predictions_densecap.jsonl.

An image appears in as many evaluation rows as its regions need (N slots a
row); its first row alone is kept, and those rows are re-batched (one per image,
the evaluation's batch size), so each image is detected and captioned once.
"""
import dataclasses
import os

import numpy as np

from pixelllm_jax import visualize
from pixelllm_jax.metrics import boxes as box_lib, densecap as densecap_metrics, segmentation
from pixelllm_jax.tasks import base, loca

NAME = "densecap"
_REGIONS = "image_regions"  # meta key: every region (boxes, phrases) of the slot's image


def detection_boxes(record: dict) -> np.ndarray:
  """float32[R, 4]: every region box of the record, in record order."""
  return np.asarray(record["regions"]["box"], np.float32).reshape(-1, 4)


def make_slots(record: dict, tokenizer: base.TextEncoder, config: base.TaskConfig
               ) -> list[base.Slot]:
  """loca's slots (one per region, its box as the prompt) with this task's instruction;
  each meta holds every region of the image (what evaluation scores against)."""
  regions = (detection_boxes(record), [base.text(p) for p in record["regions"]["phrase"]])
  context = base.context_tokens(TASK, tokenizer, config)
  return [dataclasses.replace(slot, task=NAME, context=context,
                              meta={**slot.meta, _REGIONS: regions})
          for slot in loca.make_slots(record, tokenizer, config)]


def _picture(image: np.ndarray, valid_hw, boxes: np.ndarray, captions: list[str],
             scores: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
  """The image (its valid part) with its best detection and the true box it overlaps most."""
  vh, vw = segmentation.valid_extent(valid_hw, image.shape[:2])
  image = image[:vh, :vw]
  if not len(boxes):
    return visualize.draw_boxes(image, None, None, "no detection")
  best = int(np.argmax(scores))
  gt = None
  if len(gt_boxes):
    gt = gt_boxes[int(np.argmax(box_lib.pairwise_iou(boxes[best:best + 1], gt_boxes)[0]))]
  return visualize.draw_boxes(image, boxes[best], gt, f"{captions[best]} ({scores[best]:.2f})")


def evaluate(ctx: base.EvalContext, batches: base.Batches) -> dict[str, float]:
  if ctx.dense_caption is None:
    raise ValueError("densecap evaluation needs the model's dense captioning "
                     "(a model with a box decoder: PixelLLMConfig.box_head)")
  images: dict = {}
  rows_out = []

  def score(rows: list[tuple[dict, dict]], size: int) -> None:
    padded = rows + [({k: np.zeros_like(v) for k, v in rows[0][0].items()}, None)] * (
        size - len(rows))
    batch = {name: np.stack([r[name] for r, _ in padded]) for name in rows[0][0]}
    predictions = ctx.dense_caption(batch)
    for row, (_, meta) in enumerate(rows):
      valid = np.asarray(predictions.valid[row], bool)
      boxes = np.asarray(predictions.boxes[row], np.float32)[valid]
      scores = np.asarray(predictions.scores[row], np.float32)[valid]
      tokens = np.asarray(predictions.tokens[row])[valid]
      captions = [ctx.tokenizer.decode(t.tolist()) for t in tokens]
      gt_boxes, gt_captions = meta[_REGIONS]
      key = base.image_id(meta)
      images[key] = densecap_metrics.ImageRegions(
          boxes=boxes, scores=scores, captions=captions, gt_boxes=np.asarray(gt_boxes),
          gt_captions=list(gt_captions))
      rows_out.append({"image_id": key, "boxes": boxes, "scores": scores, "captions": captions})
      if len(images) <= ctx.num_visualizations:
        picture = _picture(batch["image"][row], batch["image_valid_hw"][row], boxes, captions,
                           scores, np.asarray(gt_boxes))
        visualize.save_png(os.path.join(ctx.out_dir, f"densecap_{len(images) - 1:02d}.png"),
                           picture)

  pending: list[tuple[dict, dict]] = []
  size = 0
  seen = set()
  for batch, metas in batches:
    size = len(batch["image"])
    for row, _, meta in metas:
      key = base.image_id(meta)
      if key is None:
        raise ValueError("densecap evaluation needs each record's image_id (regions of one "
                         "image are told apart from another's by it)")
      if key in seen:
        continue
      seen.add(key)
      pending.append(({name: value[row] for name, value in batch.items()}, meta))
      if len(pending) == size:
        score(pending, size)
        pending = []
  if pending:
    score(pending, size)
  base.write_jsonl(os.path.join(ctx.out_dir, "predictions_densecap.jsonl"), rows_out)
  result = {"densecap_images": len(images),
            "densecap_detections": sum(len(i.boxes) for i in images.values())}
  if not images:
    return result
  scores = densecap_metrics.densecap_map(images.values())
  result.update({"densecap_map": scores["map"], "densecap_detmap": scores["detmap"]})
  return result


TASK = base.Task(
    name=NAME, builder="vg_densecap", instruction=loca.TASK.instruction, make_slots=make_slots,
    move_annotations=loca.TASK.move_annotations, official_augment=loca.TASK.official_augment,
    point_loss=False, evaluate=evaluate, detection_boxes=detection_boxes)
