"""Referring localization: "where is <expression>" -> the referred object's box.

Training: full-image prompt, context "where is <expr>", target <expr> (teacher
forced, no text loss, as the official referring training); the referred box
sits at the one decoder input position whose target is EOS, i.e. the hidden
state that has just read the last word.

Evaluation: the expression is teacher forced and the box read at that position
(the min/max of the token's two points), clipped to the image; P@0.5 counts
IoU > 0.5 (strict). Every expression of every image is evaluated (the official
evaluation silently kept 16 per image).
"""
import os

import numpy as np

from pixelllm_jax import visualize
from pixelllm_jax.data import augment
from pixelllm_jax.metrics import boxes as box_lib, refer as refer_metrics
from pixelllm_jax.tasks import base

NAME = "refer"


def make_slots(record: dict, tokenizer: base.TextEncoder, config: base.TaskConfig
               ) -> list[base.Slot]:
  """One slot per expression, in record order (none dropped)."""
  objects, expressions = record["objects"], record["expressions"]
  boxes = np.asarray(objects["box"], np.float32).reshape(-1, 4)
  object_ids = np.asarray(objects["id"]).reshape(-1)
  texts = list(expressions["text"])
  object_index = np.asarray(expressions["object_index"], np.int64).reshape(len(texts))
  ref_ids = np.asarray(expressions["ref_id"]).reshape(len(texts))
  sent_ids = np.asarray(expressions["sent_id"]).reshape(len(texts))
  slots = []
  for i, raw in enumerate(texts):
    expression = base.text(raw)
    box = boxes[object_index[i]]
    context = base.context_tokens(TASK, tokenizer, config, expression)
    target = base.encode_with_eos(tokenizer, expression, config.max_target_len)
    slot = base.text_slot(NAME, base.FULL_IMAGE_BOX, context, target, config, {
        "image_id": record.get("image_id"),
        "ref_id": int(ref_ids[i]),
        "sent_id": int(sent_ids[i]),
        "object_id": int(object_ids[object_index[i]]),
        "expression": expression,
        "box": box.copy(),
    }, text_loss=False)
    eos_position = len(target) - 1  # decoder_target[eos_position] == EOS
    slot.point_targets[eos_position] = base.box_points(box, config.points_per_token)
    slot.point_weights[eos_position] = 1.0
    slots.append(slot)
  return slots


def evaluate(ctx: base.EvalContext, batches: base.Batches) -> dict[str, float]:
  preds, gts, rows = [], [], []
  for batch, metas in batches:
    boxes = ctx.teacher_forced(batch).boxes
    for row, slot, meta in metas:
      pred = box_lib.clip_to_image(boxes[row, slot])
      preds.append(pred)
      gts.append(np.asarray(meta["box"], np.float32))
      rows.append({"image_id": base.image_id(meta), "sent_id": meta.get("sent_id"),
                   "expression": meta["expression"], "pred_box": pred, "gt_box": gts[-1]})
      if len(preds) <= ctx.num_visualizations:
        image = visualize.draw_boxes(batch["image"][row], pred, gts[-1], meta["expression"])
        visualize.save_png(os.path.join(ctx.out_dir, f"refer_{len(preds) - 1:02d}.png"), image)
  scores = refer_metrics.refer_precision(np.stack(preds), np.stack(gts), threshold=0.5)
  base.write_jsonl(os.path.join(ctx.out_dir, "predictions_refer.jsonl"), rows)
  return {"refer_p@0.5": scores.precision, "refer_mean_iou": scores.mean_iou,
          "refer_count": scores.count}


TASK = base.Task(
    name=NAME, builder="refer", instruction="where is", make_slots=make_slots,
    move_annotations=augment.move_objects,
    official_augment=augment.AugmentConfig(0.75, 1.25, crop=True),
    point_loss=True, evaluate=evaluate,
    # Boxes only: an image's full-size PNG masks (one per object) cost more to decode
    # than its JPEG; a mask task reading this builder would not list them.
    unread_features=("objects/mask",))
