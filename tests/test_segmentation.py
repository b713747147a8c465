"""metrics/segmentation.py on hand-computed cases: the logits -> original-size mask path, cIoU /
mIoU accumulated per expression, COCO RLE round trip."""
import json

import jax
import numpy as np
from pycocotools import mask as mask_api

from pixelllm_jax.metrics import refer, segmentation


def test_bilinear_resize_hand_values_and_jax_agreement():
  # 2 x 2 -> 4 x 4: source coordinates (i + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), .25, .75, 1.25
  # (clamped to 1); so rows and columns weigh the two sources 1:0, .75:.25, .25:.75, 0:1.
  x = np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32)
  up = segmentation.resize_bilinear(x, (4, 4))
  np.testing.assert_allclose(up[:, 0], [1.0, 0.5, -0.5, -1.0], atol=1e-7)
  np.testing.assert_allclose(up[:, 1], [0.5, 0.25, -0.25, -0.5], atol=1e-7)
  np.testing.assert_allclose(up, up[::-1, ::-1], atol=1e-7)  # the input's symmetry
  # Upsampling agrees with jax.image.resize (what the training loss uses).
  r = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  np.testing.assert_allclose(segmentation.resize_bilinear(r, (12, 20)),
                             jax.image.resize(r, (12, 20), "bilinear"), atol=1e-5)


def test_logits_to_mask_crops_the_valid_region_then_resizes_to_the_original():
  # Canvas 4 x 4 of which the left half (valid w 0.5) is image; original image 2 x 1.
  # Upsampled canvas, left two columns: [[1, .5], [.5, .25], [-.5, -.25], [-1, -.5]]; resized to
  # 2 x 1 each output averages a 2 x 2 block: .5625 and -.5625.
  logits = np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32)
  mask = segmentation.logits_to_mask(logits, (4, 4), np.array([1.0, 0.5]), (2, 1))
  np.testing.assert_array_equal(mask, [[True], [False]])
  # The full canvas resized to 2 x 2 instead: the diagonal of the input.
  full = segmentation.logits_to_mask(logits, (4, 4), np.array([1.0, 1.0]), (2, 2))
  np.testing.assert_array_equal(full, [[True, False], [False, True]])


def test_mask_counts_ciou_miou_by_hand():
  counts = segmentation.MaskCounts()
  pred_a, gt_a = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
  pred_a[:2, :2] = True           # 4 px
  gt_a[:2, :3] = True             # 6 px, containing pred_a: I 4, U 6
  pred_b, gt_b = np.zeros((3, 5), bool), np.zeros((3, 5), bool)
  pred_b[0, 0] = True             # disjoint: I 0, U 1 + 3
  gt_b[2, 2:] = True
  assert counts.add(pred_a, gt_a) == 4 / 6
  assert counts.add(pred_b, gt_b) == 0.0
  scores = counts.scores(threshold=0.5)
  assert scores.count == 2 and len(counts) == 2
  np.testing.assert_allclose(scores.ciou, 4 / 10, rtol=1e-12)         # (4 + 0) / (6 + 4)
  np.testing.assert_allclose(scores.mean_iou, (4 / 6) / 2, rtol=1e-12)
  assert scores.precision == 0.5
  # The same as scoring the masks all at once.
  assert scores == refer.segmentation_scores([pred_a, pred_b], [gt_a, gt_b])


def test_rle_round_trip_through_json():
  mask = np.random.default_rng(1).random((7, 5)) > 0.5
  rle = json.loads(json.dumps(segmentation.encode_rle(mask)))
  assert rle["size"] == [7, 5] and isinstance(rle["counts"], str)
  np.testing.assert_array_equal(segmentation.decode_rle(rle), mask)
  coded = {"size": rle["size"], "counts": rle["counts"].encode()}
  assert int(mask_api.area(coded)) == int(mask.sum())  # pycocotools reads it as COCO RLE
  empty = segmentation.encode_rle(np.zeros((3, 2), bool))
  assert not segmentation.decode_rle(empty).any()
