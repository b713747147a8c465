"""The densecap task: slots and detection targets, batches that carry them (moved with the image
by augmentation), and its evaluation on hand-made detections checked against the mAP of the same
detections computed directly."""
import shutil

import numpy as np
import pytest

from pixelllm_jax import tasks
from pixelllm_jax.data import augment, pipeline
from pixelllm_jax.metrics import densecap as densecap_metrics
from pixelllm_jax.model import Predictions
from pixelllm_jax.tasks import TASK_ID, base

EOS = 1
CONFIG = tasks.TaskConfig(max_target_len=6, max_context_len=8, points_per_token=2,
                          max_detection_boxes=3)
PHRASES = {"red": 3, "blue": 4, "square": 5, "round": 6, "thing": 7, "an": 8, "object": 9, "of": 10, "where": 11,
           "is": 12}


class WordTokenizer:
  """One id per word of a fixed vocabulary; decode inverts encode."""
  eos_id = EOS

  def encode(self, text):
    return [PHRASES[w] for w in text.split()]

  def decode(self, ids):
    words = {v: k for k, v in PHRASES.items()}
    return " ".join(words[i] for i in ids if i in words)


def record(image_id=7, num_regions=2, h=20, w=16):
  """Regions on a plain image; region i's pixels are coloured i + 1 in the red channel."""
  boxes = np.array([[1 / w, 2 / h, 6 / w, 9 / h], [8 / w, 10 / h, 15 / w, 18 / h],
                    [0.0, 0.5, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]], np.float32)[:num_regions]
  phrases = [b"red square", b"blue round", b"red thing", b"blue thing"][:num_regions]
  image = np.zeros((h, w, 3), np.uint8)
  for i, (x0, y0, x1, y1) in enumerate(boxes):
    image[round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w), 0] = i + 1
  return {"image": image, "image_id": image_id,
          "regions": {"id": np.arange(100, 100 + num_regions), "box": boxes, "phrase": phrases}}


def test_slots_are_loca_slots_and_the_targets_every_region():
  rec = record(num_regions=3)
  slots = tasks.make_slots("densecap", rec, WordTokenizer(), CONFIG)
  loca = tasks.make_slots("loca", rec, WordTokenizer(), CONFIG)
  assert [s.task for s in slots] == ["densecap"] * 3
  for slot, ref in zip(slots, loca):
    for field in ("prompt_box", "target", "context", "loss_weights", "point_weights"):
      np.testing.assert_array_equal(getattr(slot, field), getattr(ref, field))
    boxes, phrases = slot.meta["image_regions"]
    np.testing.assert_array_equal(boxes, rec["regions"]["box"])
    assert phrases == ["red square", "blue round", "red thing"]
  np.testing.assert_array_equal(tasks.get("densecap").detection_boxes(rec), rec["regions"]["box"])
  assert tasks.get("densecap").detection and not tasks.get("loca").detection


def test_packed_examples_carry_the_first_g_boxes():
  slots = tasks.make_slots("densecap", record(num_regions=4), WordTokenizer(), CONFIG)
  boxes = record(num_regions=4)["regions"]["box"]
  example = pipeline.pack_example(record()["image"], slots[:2], num_prompts=2, num_slots=2,
                                  config=CONFIG, detection_boxes=boxes)
  np.testing.assert_array_equal(example["det_boxes"], boxes[:3])  # G = 3: the 4th is dropped
  assert example["det_valid"].tolist() == [True, True, True]
  few = pipeline.pack_example(record()["image"], slots[:1], num_prompts=2, num_slots=2,
                              config=CONFIG, detection_boxes=boxes[:1])
  assert few["det_valid"].tolist() == [True, False, False] and not few["det_boxes"][1:].any()
  plain = pipeline.pack_example(record()["image"], slots[:1], num_prompts=2, num_slots=2,
                                config=CONFIG)
  assert "det_boxes" not in plain and "det_valid" not in plain


def _source(records):
  return records  # a list is a random-access data source (len, getitem)


@pytest.mark.parametrize("homogeneous", [True, False])
def test_training_batches_carry_every_region_moved_with_the_image(homogeneous):
  records = [record(image_id=i, num_regions=1 + i % 3) for i in range(6)]
  refer = {"image": np.zeros((20, 16, 3), np.uint8), "image_id": 50,
           "objects": {"id": np.array([1]), "box": np.array([[0.1, 0.1, 0.5, 0.5]], np.float32),
                       "category": np.array([1])},
           "expressions": {"ref_id": np.array([0]), "sent_id": np.array([0]),
                           "object_index": np.array([0]), "text": [b"red thing"]}}
  flip = augment.AugmentConfig(1.0, 1.0, crop=False, flip=True, flip_prob=0.5)
  ds = pipeline.make_train_dataset(
      [("densecap", _source(records), 1.0, flip), ("refer", _source([refer] * 4), 1.0)],
      WordTokenizer(), CONFIG, batch_size=2, num_slots=2, num_prompts=2, seed=0,
      canvas_size=20, homogeneous=homogeneous)
  it = iter(ds)
  seen = {"densecap": 0, "refer": 0}
  for _ in range(12):
    batch = next(it)
    ids = batch["task_ids"]
    if homogeneous and (ids == TASK_ID["refer"]).any():
      assert "det_boxes" not in batch  # a refer-only stream carries no detection targets
      seen["refer"] += 1
      continue
    assert batch["det_boxes"].shape == (2, 3, 4) and batch["det_valid"].shape == (2, 3)
    for row in range(2):
      row_ids = ids[row][ids[row] >= 0]
      if not len(row_ids) or row_ids[0] != TASK_ID["densecap"]:
        assert not batch["det_valid"][row].any()  # another task's record: no boxes
        seen["refer"] += 1
        continue
      seen["densecap"] += 1
      targets = batch["det_boxes"][row][batch["det_valid"][row]]
      # Each box is where its region's pixels are on the (possibly flipped) canvas image.
      image = batch["image"][row, ..., 0]
      valid_h, valid_w = batch["image_valid_hw"][row] * 20
      for box in targets:
        x0, y0, x1, y1 = np.round(box * [valid_w, valid_h, valid_w, valid_h]).astype(int)
        inside = image[y0:y1, x0:x1]
        assert inside.size and (inside > 0).all(), (box, image)
      # Every drawn slot's prompt is one of the targets.
      for n in np.flatnonzero(ids[row] >= 0):
        box = batch["prompt_boxes"][row, batch["prompt_index"][row, n]]
        assert np.abs(targets - box).max(-1).min() < 1e-6
  assert seen["densecap"] > 3 and seen["refer"] > 0


class _FakeModel:
  """dense_caption(batch): for each row, the regions of the record whose image it is (found
  by the image's bytes), shifted by `shift`, scored in order, captioned with `captions`."""

  def __init__(self, records, shift, captions, d=4):
    self.by_image = {r["image"].tobytes(): r for r in records}
    self.shift, self.captions, self.d = shift, captions, d
    self.calls = 0

  def __call__(self, batch):
    self.calls += 1
    b = batch["image"].shape[0]
    boxes, scores = np.zeros((b, self.d, 4), np.float32), np.zeros((b, self.d), np.float32)
    valid, tokens = np.zeros((b, self.d), bool), np.zeros((b, self.d, 6), np.int32)
    for row in range(b):
      rec = self.by_image.get(batch["image"][row].tobytes())
      if rec is None:
        continue
      for i, box in enumerate(rec["regions"]["box"]):
        boxes[row, i] = np.clip(box + self.shift, 0, 1)
        scores[row, i] = 1.0 - 0.1 * i
        valid[row, i] = True
        ids = WordTokenizer().encode(self.captions[i]) + [EOS]
        tokens[row, i, :len(ids)] = ids
    return Predictions(tokens=tokens, points=np.zeros((b, self.d, 6, 2, 2), np.float32),
                       boxes=boxes, scores=scores, valid=valid)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_evaluation_scores_the_detections_of_each_image_once(tmp_path):
  records = [record(image_id=i, num_regions=2 + i % 3) for i in range(5)]
  for i, r in enumerate(records):
    r["image"][0, 0, 1] = i  # each image its own bytes
  captions = ["red square", "red thing", "blue thing", "blue round"]
  fake = _FakeModel(records, shift=np.float32([0.02, 0.0, 0.02, 0.0]), captions=captions)
  ctx = base.EvalContext(teacher_forced=None, generate=None, tokenizer=WordTokenizer(),
                         out_dir=str(tmp_path), num_visualizations=2, dense_caption=fake)
  batches = pipeline.eval_batches("densecap", _source(records), WordTokenizer(), CONFIG,
                                  batch_size=2, num_slots=2, num_prompts=2)
  metrics = tasks.get("densecap").evaluate(ctx, batches)
  images = [densecap_metrics.ImageRegions(
      boxes=np.clip(r["regions"]["box"] + np.float32([0.02, 0.0, 0.02, 0.0]), 0, 1),
      scores=1.0 - 0.1 * np.arange(len(r["regions"]["box"])),
      captions=captions[:len(r["regions"]["box"])], gt_boxes=r["regions"]["box"],
      gt_captions=[p.decode() for p in r["regions"]["phrase"]]) for r in records]
  want = densecap_metrics.densecap_map(images)
  assert metrics["densecap_images"] == 5
  assert fake.calls == 3  # 5 images, batches of 2, each image once (some span 2 rows)
  assert metrics["densecap_detections"] == sum(len(i.boxes) for i in images)
  np.testing.assert_allclose(metrics["densecap_map"], want["map"], rtol=1e-12)
  np.testing.assert_allclose(metrics["densecap_detmap"], want["detmap"], rtol=1e-12)
  assert 0 < want["map"] < want["detmap"] == 1.0  # every box found; some captions wrong
  assert (tmp_path / "predictions_densecap.jsonl").read_text().count("\n") == 5
  assert (tmp_path / "densecap_00.png").exists() and (tmp_path / "densecap_01.png").exists()
  with pytest.raises(ValueError, match="box decoder"):
    tasks.get("densecap").evaluate(
        base.EvalContext(None, None, WordTokenizer(), str(tmp_path), 0), batches)
