"""Location-conditioned captioning on referring data (the paper's RefCOCOg table).

Each referring expression is a region-caption slot: the referred object's box as the prompt,
"an object of" as the context (the official loca context) and the expression as the target, so
the model describes the object at a given location. As the official RefCOCOg loca evaluation
(`refcocog_umd_loca_validation`, `merge_gt_boxes=False`): every expression is its own scored item
with that one expression as its reference, even when several expressions share a box (their
prompts are identical, so the decoded caption is repeated and scored against each). Scores are
the COCO caption toolkit's (CIDEr-D, METEOR, BLEU-4, ROUGE-L) plus exact match.

Officially evaluation only (the paper trains location-conditioned captioning on Visual Genome
regions and dense captioning); as a training task it teaches the same mapping from RefCOCO-style
records, with the referring augmentation.
"""
import numpy as np

from pixelllm_jax.data import augment
from pixelllm_jax.tasks import base, caption, loca

NAME = "refer_loca"


def make_slots(record: dict, tokenizer: base.TextEncoder, config: base.TaskConfig
               ) -> list[base.Slot]:
  """One slot per expression: prompt = its object's box, target = the expression."""
  objects, expressions = record["objects"], record["expressions"]
  boxes = np.asarray(objects["box"], np.float32).reshape(-1, 4)
  texts = list(expressions["text"])
  object_index = np.asarray(expressions["object_index"], np.int64).reshape(len(texts))
  sent_ids = np.asarray(expressions["sent_id"]).reshape(len(texts))
  context = base.context_tokens(TASK, tokenizer, config)
  slots = []
  for i, raw in enumerate(texts):
    expression = base.text(raw)
    box = boxes[object_index[i]]
    slots.append(base.text_slot(
        NAME, box, context, base.encode_with_eos(tokenizer, expression, config.max_target_len),
        config, {"image_id": record.get("image_id"), "sent_id": int(sent_ids[i]),
                 "reference": expression, "box": box.copy()}))
  return slots


def _expression_key(meta: dict):
  """Each expression is its own item (official: no merging of expressions of one box)."""
  image_id = base.image_id(meta)
  return None if image_id is None else ("expression", image_id, meta["sent_id"])


def evaluate(ctx: base.EvalContext, batches: base.Batches) -> dict[str, float]:
  return caption.evaluate_captions(ctx, batches, NAME, _expression_key, exact_match=True)


TASK = base.Task(
    name=NAME, builder="refer", instruction=loca.TASK.instruction, make_slots=make_slots,
    move_annotations=augment.move_objects,
    official_augment=augment.AugmentConfig(0.75, 1.25, crop=True),  # the referring recipe
    point_loss=False, evaluate=evaluate, unread_features=("objects/mask",))
