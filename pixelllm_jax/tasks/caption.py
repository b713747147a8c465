"""Captioning: a full-image prompt, "a photo of" style instruction, the caption as target.

Data: the `caption` of Localized Narratives records (one narrative per record),
or COCO captions (`coco_captions` builder, several per image). Evaluation
decodes greedily with the KV cache and scores CIDEr-D against the references.
"""
import os

import numpy as np

from pixelllm_jax.data import augment
from pixelllm_jax.metrics import captioning
from pixelllm_jax.tasks import base

NAME = "caption"


def make_slots(record: dict, tokenizer: base.TextEncoder, config: base.TaskConfig
               ) -> list[base.Slot]:
  """One slot per caption (`caption`: bytes, or a list of bytes): full image, text loss."""
  captions = record["caption"]
  captions = [captions] if isinstance(captions, (bytes, str)) else list(captions)
  context = base.context_tokens(TASK, tokenizer, config)
  return [
      base.text_slot(NAME, base.FULL_IMAGE_BOX, context,
                     base.encode_with_eos(tokenizer, base.text(c), config.max_target_len),
                     config, {"image_id": record.get("image_id"), "reference": base.text(c)})
      for c in captions
  ]


def evaluate_captions(ctx: base.EvalContext, batches: base.Batches, task: str, *,
                      exact_match: bool = False) -> dict[str, float]:
  """Greedy captions of every slot scored with CIDEr-D (and optionally exact match)
  against its reference; every prediction to `predictions_<task>.jsonl`."""
  predictions, references, rows = {}, {}, []
  for batch, metas in batches:
    tokens = ctx.generate(batch).tokens
    for row, slot, meta in metas:
      key = len(predictions)
      predictions[key] = ctx.tokenizer.decode(np.asarray(tokens[row, slot]).tolist())
      references[key] = [meta["reference"]]
      rows.append({"image_id": base.image_id(meta), "prediction": predictions[key],
                   "reference": meta["reference"]}
                  | ({"box": meta["box"]} if "box" in meta else {}))
  base.write_jsonl(os.path.join(ctx.out_dir, f"predictions_{task}.jsonl"), rows)
  result = {f"{task}_cider": captioning.cider(predictions, references),
            f"{task}_count": len(predictions)}
  if exact_match:
    result[f"{task}_exact_match"] = captioning.exact_match(predictions, references)
  return result


def evaluate(ctx: base.EvalContext, batches: base.Batches) -> dict[str, float]:
  return evaluate_captions(ctx, batches, NAME)


TASK = base.Task(
    name=NAME, builder="localized_narratives", instruction="a photo of", make_slots=make_slots,
    move_annotations=augment.move_narrative,
    official_augment=augment.AugmentConfig(0.75, 1.25, crop=True),  # COCO captions
    point_loss=False, evaluate=evaluate)
