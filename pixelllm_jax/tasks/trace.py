"""Trace generation (Localized Narratives): a narrative with a location for every word.

Training: full-image prompt, "describe in detail" instruction, the narrative
as target; each token is localized by the timed utterance it falls in
(`data.trace.assign_utterances_to_tokens`, by relative position), computed
over the *whole* narrative before truncation, so a truncated narrative keeps
the utterances of its own words instead of being stretched over all of them (a
deliberate change from the official code, which matches after truncation).
With P = 2 a token's target is its utterance's trace box, with P = 1 its
time-averaged trace point.

Evaluation: the ground-truth narrative is teacher forced; `trace_l1` is the
official per-token L1 (normalized coordinates) averaged per image;
`trace_pointing_acc` is the fraction of object words (utterances that name an
object, from the generated world's scenes) whose predicted point (midpoint of
the token's points) lies inside that object's box. The narrative is also
generated greedily for the pictures.
"""
import os

import numpy as np

from pixelllm_jax import visualize
from pixelllm_jax.batch import EOS_ID, PAD_ID
from pixelllm_jax.data import augment, trace
from pixelllm_jax.metrics import trace as trace_metrics
from pixelllm_jax.tasks import base

NAME = "trace"


def make_slots(record: dict, tokenizer: base.TextEncoder, config: base.TaskConfig
               ) -> list[base.Slot]:
  """One slot per narrative: full image, narrative target, per-token utterance location.

  meta["utterance_of_token"] int32[len(target)]: the utterance index of each
  target token, -1 for EOS and for tokens without a valid utterance.
  An augmented record may carry `utterance_in_view` bool[U]: utterances a crop
  left outside keep their place in the alignment but get point weight 0.
  """
  length, p = config.max_target_len, config.points_per_token
  narrative = base.text(record["caption"])
  ids = list(tokenizer.encode(narrative))
  valid = trace.utterance_valid(record)
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
  context = base.context_tokens(TASK, tokenizer, config)
  slot = base.text_slot(NAME, base.FULL_IMAGE_BOX, context, target, config, {
      "image_id": record.get("image_id"),
      "reference": narrative,
      "utterances": [base.text(u) for u in record["utterances"]],
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
      slot.point_targets[j + 1] = base.box_points(boxes[u], 2)
    else:
      slot.point_targets[j + 1] = np.clip(points[u], 0.0, 1.0)[None]
    slot.point_weights[j + 1] = 1.0
  return [slot]


def evaluate(ctx: base.EvalContext, batches: base.Batches) -> dict[str, float]:
  pred_per_image, gt_per_image = [], []
  pointing_pred, pointing_boxes = [], []
  shown = 0
  for batch, metas in batches:
    points = ctx.teacher_forced(batch).points  # points[..., j, :, :] localizes target j
    # Targets and weights sit at decoder input positions: target j at j + 1.
    weights = batch["point_weights"][:, :, 1:]
    targets = batch["point_targets"][:, :, 1:]
    for row, slot, meta in metas:
      w = weights[row, slot] > 0
      pred_per_image.append(points[row, slot, :-1][w])
      gt_per_image.append(targets[row, slot][w])
      scene = ctx.scenes.get(base.image_id(meta))
      if scene is None:
        continue
      height, width = scene["height"], scene["width"]
      box_of = {o["id"]: np.asarray(o["box_xyxy"], np.float32) / [width, height, width, height]
                for o in scene["objects"]}
      for j, u in enumerate(meta["utterance_of_token"]):
        obj = scene["utterance_objects"][u] if u >= 0 else -1
        if obj >= 0:
          pointing_pred.append(points[row, slot, j])
          pointing_boxes.append(box_of[obj])
    if shown < ctx.num_visualizations:
      generated = ctx.generate(batch)
      for row, slot, meta in metas[: ctx.num_visualizations - shown]:
        ids = [int(t) for t in generated.tokens[row, slot] if t not in (PAD_ID, EOS_ID)]
        words = [ctx.tokenizer.decode([t]) for t in ids]
        image = visualize.draw_words(batch["image"][row], words,
                                     generated.points[row, slot, : len(ids)].mean(-2))
        visualize.save_png(os.path.join(ctx.out_dir, f"trace_{shown:02d}.png"), image)
        shown += 1
  result = {"trace_l1": trace_metrics.point_l1(pred_per_image, gt_per_image),
            "trace_images": len(pred_per_image)}
  if pointing_pred:
    result["trace_pointing_acc"] = trace_metrics.pointing_accuracy(
        np.stack(pointing_pred), np.stack(pointing_boxes))
    result["trace_object_words"] = len(pointing_pred)
  return result


TASK = base.Task(
    name=NAME, builder="localized_narratives", instruction="describe in detail",
    make_slots=make_slots, move_annotations=augment.move_narrative,
    official_augment=augment.AugmentConfig(1.0, 1.0),  # Localized Narratives: no jitter
    point_loss=True, evaluate=evaluate)
