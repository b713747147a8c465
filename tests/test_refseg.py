"""The refseg task: slots with mask targets, masks moved with the image by augmentation, batches
that carry them, and its evaluation on hand-made predictions (cIoU / mIoU / P@0.5, RLE rows)."""
import json

import numpy as np
import pytest

from pixelllm_jax import tasks
from pixelllm_jax.data import augment, pipeline
from pixelllm_jax.metrics import segmentation
from pixelllm_jax.model import Predictions
from pixelllm_jax.tasks import TASK_ID

EOS = 1
CONFIG = tasks.TaskConfig(max_target_len=6, max_context_len=8, points_per_token=2)


class CharTokenizer:
  """One id per word (its length + 3): enough to check contexts and targets."""
  eos_id = EOS

  def encode(self, text):
    return [3 + len(w) for w in text.split()]


def record(h=20, w=16):
  """Two objects with exact masks; the image is red exactly on object 0 and blue on object 1."""
  masks = np.zeros((2, h, w, 1), np.uint8)
  masks[0, 2:9, 1:6] = 1
  masks[1, 10:18, 8:15] = 1
  image = np.zeros((h, w, 3), np.uint8)
  image[masks[0, ..., 0] > 0, 0] = 255
  image[masks[1, ..., 0] > 0, 2] = 255
  boxes = np.array([[1 / w, 2 / h, 6 / w, 9 / h], [8 / w, 10 / h, 15 / w, 18 / h]], np.float32)
  return {"image": image, "image_id": 7,
          "objects": {"id": np.array([11, 12]), "box": boxes, "category": np.array([1, 1]),
                      "mask": masks},
          "expressions": {"ref_id": np.array([0, 1, 2]), "sent_id": np.array([5, 6, 7]),
                          "object_index": np.array([1, 0, 1]),
                          "text": [b"the blue one", b"red left", b"right square"]}}


def test_slots_are_refer_slots_with_the_objects_masks():
  rec = record()
  slots = tasks.make_slots("refseg", rec, CharTokenizer(), CONFIG)
  refer_slots = tasks.make_slots("refer", rec, CharTokenizer(), CONFIG)
  assert [s.task for s in slots] == ["refseg"] * 3
  for slot, ref, index in zip(slots, refer_slots, [1, 0, 1]):
    np.testing.assert_array_equal(slot.mask, rec["objects"]["mask"][index, ..., 0] > 0)
    np.testing.assert_array_equal(slot.meta["gt_mask"], slot.mask)
    for field in ("target", "context", "loss_weights", "point_targets", "point_weights"):
      np.testing.assert_array_equal(getattr(slot, field), getattr(ref, field))
    assert not slot.loss_weights.any() and slot.point_weights.sum() == 1  # box at EOS only
    assert slot.meta["sent_id"] == ref.meta["sent_id"]
  assert tasks.get("refseg").mask_loss and not tasks.get("refer").mask_loss
  assert tasks.get("refseg").unread_features == ()  # it reads the masks refer skips
  assert "objects/mask" in tasks.get("refer").unread_features


@pytest.mark.parametrize("seed", range(4))
def test_crop_and_flip_move_the_mask_with_the_image(seed):
  # Scale 1.25 of a 16 canvas is the image's own long side (20): no resampling, only a 16 x 16
  # crop at a random offset and a flip, so the masks must match the coloured pixels exactly.
  config = augment.AugmentConfig(1.25, 1.25, crop=True, flip=True, flip_prob=0.5,
                                 min_visible_fraction=0.0)
  rec, valid_hw = augment.transform_record(record(), tasks.get("refseg"), canvas=16,
                                           augment=config, train=True,
                                           rng=np.random.default_rng(seed))
  np.testing.assert_array_equal(valid_hw, [1.0, 1.0])
  slots = tasks.make_slots("refseg", rec, CharTokenizer(), CONFIG)
  assert len(slots) == 3
  colour = {0: 0, 1: 2}  # object index -> its image channel
  for slot, index in zip(slots, rec["expressions"]["object_index"]):
    np.testing.assert_array_equal(slot.mask, rec["image"][..., colour[int(index)]] == 255)
    assert slot.mask.any()
    # Evaluation scores against the object's mask before augmentation.
    np.testing.assert_array_equal(slot.meta["gt_mask"], record()["objects"]["mask"][index, ..., 0])


def test_canvas_padding_puts_the_mask_on_the_padded_image():
  rec, valid_hw = augment.transform_record(record(h=20, w=16), tasks.get("refseg"), canvas=40,
                                           augment=None, train=True)
  np.testing.assert_allclose(valid_hw, [0.5, 0.4])
  slots = tasks.make_slots("refseg", rec, CharTokenizer(), CONFIG)
  assert slots[0].mask.shape == (40, 40) and not slots[0].mask[20:].any()
  np.testing.assert_array_equal(slots[1].mask[:20, :16], record()["objects"]["mask"][0, ..., 0])


def test_batches_carry_masks_only_for_mask_tasks():
  rec = record()
  slots = tasks.make_slots("refseg", rec, CharTokenizer(), CONFIG)
  example = pipeline.pack_example(rec["image"], slots[:2], num_prompts=1, num_slots=3,
                                  config=CONFIG, with_masks=True)
  assert example["mask_targets"].shape == (3, 20, 16) and example["mask_targets"].dtype == bool
  np.testing.assert_array_equal(example["mask_targets"][0], slots[0].mask)
  assert not example["mask_targets"][2].any()  # the empty slot
  np.testing.assert_array_equal(example["task_ids"], [TASK_ID["refseg"]] * 2 + [-1])
  with pytest.raises(ValueError, match="with_masks"):
    pipeline.pack_example(rec["image"], slots, num_prompts=1, num_slots=3, config=CONFIG)
  # A refer stream has no mask field; a refseg stream and any mixture holding refseg have one.
  refer_slots = tasks.make_slots("refer", rec, CharTokenizer(), CONFIG)
  assert "mask_targets" not in pipeline.pack_example(rec["image"], refer_slots, num_prompts=1,
                                                     num_slots=3, config=CONFIG)
  assert pipeline.with_masks(["refseg"]) and pipeline.with_masks(["refer", "refseg"])
  assert not pipeline.with_masks(["refer", "trace", "caption", "loca"])
  batches = list(pipeline.eval_batches("refseg", [rec, rec], CharTokenizer(), CONFIG,
                                       batch_size=2, num_slots=2, num_prompts=1))
  assert [b["mask_targets"].shape for b, _ in batches] == [(2, 2, 20, 16)] * 2
  stream = pipeline.make_train_dataset([("refseg", [rec] * 4, 1.0), ("refer", [rec] * 4, 1.0)],
                                       CharTokenizer(), CONFIG, batch_size=2, num_slots=3,
                                       num_prompts=1, seed=0, homogeneous=True)
  it = iter(stream)
  kinds = {(int(b["task_ids"].max()), "mask_targets" in b) for b in (next(it) for _ in range(8))}
  assert kinds == {(TASK_ID["refseg"], True), (TASK_ID["refer"], False)}, kinds


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_evaluate_scores_masks_at_the_original_size_and_writes_rle(tmp_path):
  # One 4 x 4 image, two expressions; logits at the canvas resolution (no upsampling), the
  # image filling the canvas: each predicted mask is logits > 0.
  gt = np.zeros((2, 4, 4), bool)
  gt[0, :2, :3] = True                 # 6 px
  gt[1, 3, 1:] = True                  # 3 px
  logits = np.full((1, 2, 4, 4), -3.0, np.float32)
  logits[0, 0, :2, :2] = 2.0           # inside gt 0: I 4, U 6
  logits[0, 1, 0, 0] = 1.0             # disjoint from gt 1: I 0, U 4
  boxes = np.array([[[0.0, 0.0, 0.75, 0.5], [0.0, 0.0, 0.2, 0.2]]], np.float32)
  predictions = Predictions(tokens=np.zeros((1, 2, 3), np.int32),
                            points=np.zeros((1, 2, 3, 2, 2), np.float32), boxes=boxes,
                            mask_logits=logits, mask_iou=np.array([[0.9, 0.1]], np.float32))
  batch = {"image": np.zeros((1, 4, 4, 3), np.uint8),
           "image_valid_hw": np.ones((1, 2), np.float32)}
  metas = [(0, s, {"image_id": 3, "sent_id": 10 + s, "expression": f"e{s}", "gt_mask": gt[s],
                   "box": np.array([0.0, 0.0, 0.75, 0.5], np.float32)}) for s in range(2)]
  ctx = tasks.base.EvalContext(teacher_forced=lambda b: predictions, generate=None,
                               tokenizer=None, out_dir=str(tmp_path), num_visualizations=1)
  metrics = tasks.get("refseg").evaluate(ctx, [(batch, metas)])
  np.testing.assert_allclose(metrics["refseg_ciou"], 4 / 10, rtol=1e-12)
  np.testing.assert_allclose(metrics["refseg_miou"], (4 / 6) / 2, rtol=1e-12)
  assert metrics["refseg_mask_p@0.5"] == 0.5
  assert metrics["refseg_p@0.5"] == 0.5  # box 0 is its gt box, box 1 misses
  assert metrics["refseg_count"] == 2
  rows = _read_jsonl(tmp_path / "predictions_refseg.jsonl")
  assert [r["sent_id"] for r in rows] == [10, 11]
  for s, row in enumerate(rows):
    np.testing.assert_array_equal(segmentation.decode_rle(row["pred_mask"]), logits[0, s] > 0)
  np.testing.assert_allclose([r["mask_iou"] for r in rows], [4 / 6, 0.0])
  np.testing.assert_allclose([r["predicted_iou"] for r in rows], [0.9, 0.1], rtol=1e-6)
  assert (tmp_path / "refseg_00.png").exists() and not (tmp_path / "refseg_01.png").exists()
