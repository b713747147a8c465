"""Captioning: a full-image prompt, "a photo of" style instruction, the caption as target.

Data: the `caption` of Localized Narratives records (one narrative per record),
or COCO captions (`coco_captions` builder, several per image). Evaluation
decodes greedily with the KV cache and scores each image's caption against all
of its references (COCO: 5) with the COCO caption toolkit: CIDEr-D, METEOR,
BLEU-4, ROUGE-L.
"""
from collections.abc import Callable, Hashable
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


def evaluate_captions(ctx: base.EvalContext, batches: base.Batches, task: str,
                      item_key: Callable[[dict], Hashable | None], *,
                      exact_match: bool = False) -> dict[str, float]:
  """Greedy captions scored as the COCO caption toolkit scores them (metrics/captioning.py).

  Slots with the same `item_key(meta)` (an image, a region) are one scored item: one prediction
  against the references of all its slots (a COCO image's 5 captions). The prediction is the
  item's first slot's: its other slots have the same image and prompt, so greedy decoding gives
  the same caption. A key of None makes the slot an item of its own. Writes one row per item to
  `predictions_<task>.jsonl`. Settings (toolkit tokenization and METEOR, or the explicit offline
  opt-out) come from $PIXELLLM_CAPTION_METRICS and are checked before any decoding.

  -> <task>_cider (CIDEr-D), _meteor, _bleu4, _rouge_l (and _exact_match), toolkit scale, and
  <task>_count, the number of items (nothing but the count when there is no item).
  """
  settings = captioning.settings_from_env()
  captioning.check_available(**settings)
  items: dict[Hashable, dict] = {}
  for batch, metas in batches:
    tokens = ctx.generate(batch).tokens
    for row, slot, meta in metas:
      key = item_key(meta)
      key = ("slot", len(items)) if key is None else key
      if key not in items:
        items[key] = {"image_id": base.image_id(meta),
                      "prediction": ctx.tokenizer.decode(np.asarray(tokens[row, slot]).tolist()),
                      "references": []} | {k: meta[k] for k in ("region_id", "box") if k in meta}
      items[key]["references"].append(meta["reference"])
  base.write_jsonl(os.path.join(ctx.out_dir, f"predictions_{task}.jsonl"), items.values())
  result = {f"{task}_count": len(items)}
  if not items:
    return result
  scores = captioning.caption_scores({k: v["prediction"] for k, v in items.items()},
                                     {k: v["references"] for k, v in items.items()},
                                     exact_match=exact_match, **settings)
  names = {"CIDEr": "cider", "METEOR": "meteor", "Bleu_4": "bleu4", "ROUGE_L": "rouge_l",
           "exact_match": "exact_match"}
  result.update({f"{task}_{names[k]}": v for k, v in scores.items() if k in names})
  return result


def _image_key(meta: dict) -> Hashable | None:
  image_id = base.image_id(meta)
  return None if image_id is None else ("image", image_id)


def evaluate(ctx: base.EvalContext, batches: base.Batches) -> dict[str, float]:
  """Each image's caption against all of its references (its records' captions pooled)."""
  return evaluate_captions(ctx, batches, NAME, _image_key)


TASK = base.Task(
    name=NAME, builder="localized_narratives", instruction="a photo of", make_slots=make_slots,
    move_annotations=augment.move_narrative,
    official_augment=augment.AugmentConfig(0.75, 1.25, crop=True),  # COCO captions
    point_loss=False, evaluate=evaluate)
