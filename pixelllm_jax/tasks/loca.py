"""Location-conditioned captioning: a region's box as the prompt -> its phrase.

Data: GRiT-style Visual Genome dense-captioning records (one slot per region,
the region box as its own prompt, "an object of" instruction). Evaluation
decodes greedily and scores each region's phrase against its reference with
the COCO caption toolkit (CIDEr-D, METEOR, BLEU-4, ROUGE-L) plus exact match.
"""
import numpy as np

from pixelllm_jax.data import augment
from pixelllm_jax.tasks import base, caption

NAME = "loca"


def make_slots(record: dict, tokenizer: base.TextEncoder, config: base.TaskConfig
               ) -> list[base.Slot]:
  """One slot per region: prompt = region box, context "an object of", phrase target."""
  regions = record["regions"]
  boxes = np.asarray(regions["box"], np.float32).reshape(-1, 4)
  phrases = list(regions["phrase"])
  region_ids = np.asarray(regions["id"]).reshape(len(phrases))
  context = base.context_tokens(TASK, tokenizer, config)
  return [
      base.text_slot(NAME, boxes[i], context,
                     base.encode_with_eos(tokenizer, base.text(phrase), config.max_target_len),
                     config, {"image_id": record.get("image_id"), "region_id": int(region_ids[i]),
                              "reference": base.text(phrase), "box": boxes[i].copy()})
      for i, phrase in enumerate(phrases)
  ]


def evaluate(ctx: base.EvalContext, batches: base.Batches) -> dict[str, float]:
  """Each region's phrase against its own reference, as the official LocaEvaluator is configured
  for VG and RefCOCOg (merge_gt_boxes=False): every region is an item, even one whose box
  repeats another region's."""
  return caption.evaluate_captions(ctx, batches, NAME, lambda meta: None, exact_match=True)


TASK = base.Task(
    name=NAME, builder="vg_densecap", instruction="an object of", make_slots=make_slots,
    move_annotations=augment.move_regions,
    official_augment=augment.AugmentConfig(0.1, 2.0, crop=True, flip=True),  # Visual Genome
    point_loss=False, evaluate=evaluate)
