"""Referring segmentation: "where is <expression>" -> the referred object's box and mask.

Data: the refer builder's records *with* their per-object masks (RefCOCO masks
from polygons / RLE, the generated world's exact masks), so, unlike refer, no
feature is left unread. Slots are refer's (full-image prompt, the expression
teacher forced with no text loss, the box supervised at the position whose
target is EOS: official refseg trains the point and mask losses) plus the
referred object's mask on the packed image (`Slot.mask`), which augmentation
moves with the image (crop / resize / flip: `augment.move_objects`).

The mask head (models/heads/mask.py) segments from the box the model itself
predicts there, in training too (official).

Evaluation (official refseg evaluator): the expression is teacher forced, the
box read as for refer; the mask's low-res logits are upsampled to the canvas,
cropped to the image, resized to the original image and thresholded at 0
(`metrics.segmentation.logits_to_mask`), then scored against the ground-truth
mask at that resolution: `refseg_ciou` (sum of intersections / sum of unions
over all expressions), `refseg_miou` (mean per-expression IoU),
`refseg_mask_p@0.5` (IoU > 0.5) and the boxes' `refseg_p@0.5`. Every
prediction goes to predictions_refseg.jsonl with its mask as COCO RLE.
"""
import dataclasses
import os

import numpy as np

from pixelllm_jax import visualize
from pixelllm_jax.data import augment
from pixelllm_jax.metrics import boxes as box_lib, refer as refer_metrics, segmentation
from pixelllm_jax.tasks import base, refer

NAME = "refseg"
# The objects' masks as the record held them before augmentation moved them: evaluation
# scores at the original resolution.
_SOURCE_MASK = "source_mask"


def _mask_HxW(mask) -> np.ndarray:
  mask = np.asarray(mask)
  return (mask.reshape(mask.shape[:2]) if mask.ndim == 3 else mask) > 0


def move_annotations(record: dict, coords, params, min_fraction: float) -> dict:
  """`augment.move_objects`, keeping each kept object's original mask as well."""
  objects = record["objects"]
  if "mask" in objects and _SOURCE_MASK not in objects:
    record = {**record, "objects": {**objects, _SOURCE_MASK: list(objects["mask"])}}
  return augment.move_objects(record, coords, params, min_fraction)


def make_slots(record: dict, tokenizer: base.TextEncoder, config: base.TaskConfig
               ) -> list[base.Slot]:
  """One slot per expression, in record order: refer's slot with the object's mask."""
  objects, expressions = record["objects"], record["expressions"]
  if "mask" not in objects:
    raise ValueError(f"refseg record (image_id={record.get('image_id')!r}) has no object masks "
                     "(objects/mask): was the feature left unread?")
  masks = list(objects["mask"])
  sources = list(objects.get(_SOURCE_MASK, masks))
  image_hw = np.shape(record["image"])[:2]
  object_index = np.asarray(expressions["object_index"], np.int64).reshape(-1)
  slots = []
  for slot, i in zip(refer.make_slots(record, tokenizer, config), object_index, strict=True):
    mask = _mask_HxW(masks[i])
    on_image = np.zeros(image_hw, bool)  # the padded canvas when there is one
    on_image[:mask.shape[0], :mask.shape[1]] = mask
    slots.append(dataclasses.replace(
        slot, task=NAME, mask=on_image,
        context=base.context_tokens(TASK, tokenizer, config, slot.meta["expression"]),
        meta={**slot.meta, "gt_mask": _mask_HxW(sources[i])}))
  return slots


def _picture(image: np.ndarray, valid_hw, pred_mask: np.ndarray, pred_box, gt_box,
             label: str) -> np.ndarray:
  """The image (its valid part) with the predicted mask tinted red and both boxes."""
  vh, vw = segmentation.valid_extent(valid_hw, image.shape[:2])
  image = image[:vh, :vw].astype(np.float32)
  mask = segmentation.resize_bilinear(pred_mask.astype(np.float32), (vh, vw)) > 0.5
  tint = np.asarray(visualize.PRED_COLOUR, np.float32)
  image[mask] = 0.5 * image[mask] + 0.5 * tint
  return visualize.draw_boxes(image.astype(np.uint8), pred_box, gt_box, label)


def evaluate(ctx: base.EvalContext, batches: base.Batches) -> dict[str, float]:
  counts = segmentation.MaskCounts()
  pred_boxes, gt_boxes, rows = [], [], []
  for batch, metas in batches:
    predictions = ctx.teacher_forced(batch)
    if predictions.mask_logits is None:
      raise ValueError("refseg evaluation needs a model with a mask head "
                       "(PixelLLMConfig.mask_head)")
    canvas_hw = tuple(np.shape(batch["image"])[1:3])
    for row, slot, meta in metas:
      gt_mask = np.asarray(meta["gt_mask"], bool)
      pred_mask = segmentation.logits_to_mask(
          predictions.mask_logits[row, slot], canvas_hw, batch["image_valid_hw"][row],
          gt_mask.shape)
      iou = counts.add(pred_mask, gt_mask)
      pred_box = box_lib.clip_to_image(predictions.boxes[row, slot])
      gt_box = np.asarray(meta["box"], np.float32)
      pred_boxes.append(pred_box)
      gt_boxes.append(gt_box)
      rows.append({"image_id": base.image_id(meta), "sent_id": meta.get("sent_id"),
                   "expression": meta["expression"], "pred_box": pred_box, "gt_box": gt_box,
                   "mask_iou": iou, "predicted_iou": float(predictions.mask_iou[row, slot]),
                   "pred_mask": segmentation.encode_rle(pred_mask)})
      if len(counts) <= ctx.num_visualizations:
        picture = _picture(batch["image"][row], batch["image_valid_hw"][row], pred_mask,
                           pred_box, gt_box, f"{meta['expression']} (IoU {iou:.2f})")
        visualize.save_png(os.path.join(ctx.out_dir, f"refseg_{len(counts) - 1:02d}.png"),
                           picture)
  base.write_jsonl(os.path.join(ctx.out_dir, "predictions_refseg.jsonl"), rows)
  masks = counts.scores(threshold=0.5)
  box_scores = refer_metrics.refer_precision(np.stack(pred_boxes), np.stack(gt_boxes), 0.5)
  return {"refseg_ciou": masks.ciou, "refseg_miou": masks.mean_iou,
          "refseg_mask_p@0.5": masks.precision, "refseg_p@0.5": box_scores.precision,
          "refseg_count": masks.count}


TASK = base.Task(
    name=NAME, builder="refer", instruction=refer.TASK.instruction, make_slots=make_slots,
    move_annotations=move_annotations, official_augment=refer.TASK.official_augment,
    point_loss=True, evaluate=evaluate, mask_loss=True)
