"""Metrics against hand-computed values: box IoU, refer P@0.5, cIoU, trace L1, pointing, captions."""
import shutil

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from pixelllm_jax.metrics import boxes, captioning, refer, trace


# ----------------------------------------------------------------------------- boxes

def test_iou_hand_values():
  a = np.array([[0.0, 0.0, 2.0, 2.0]])
  b = np.array([[1.0, 1.0, 3.0, 3.0],    # inter 1, union 4 + 4 - 1 = 7
                [0.0, 0.0, 2.0, 2.0],    # identical
                [2.0, 0.0, 4.0, 2.0],    # shares an edge only
                [0.0, 0.0, 2.0, 1.0]])   # inside, half the area
  np.testing.assert_allclose(boxes.pairwise_iou(a, b), [[1 / 7, 1.0, 0.0, 0.5]], rtol=1e-12)
  assert boxes.pairwise_iou(np.zeros((2, 4)), b).shape == (2, 4)
  np.testing.assert_allclose(boxes.paired_iou(np.repeat(a, 4, axis=0), b), [1 / 7, 1.0, 0.0, 0.5])
  # Degenerate boxes: zero union gives IoU 0, not NaN.
  assert boxes.paired_iou([0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3]) == 0.0


def test_conversions():
  pixels = boxes.to_pixels([0.5, 0.25, 1.0, 1.0], width=200, height=100)
  np.testing.assert_allclose(pixels, [100, 25, 200, 100])
  np.testing.assert_allclose(boxes.to_normalized(pixels, 200, 100), [0.5, 0.25, 1.0, 1.0])
  np.testing.assert_allclose(boxes.to_pixels([[0.5, 0.5]], 10, 20), [[5, 10]])
  np.testing.assert_allclose(boxes.clip_to_image([-0.1, 0.2, 1.3, 0.9]), [0.0, 0.2, 1.0, 0.9])
  np.testing.assert_allclose(boxes.clip_to_image([-5, 50, 250, 120], 200, 100), [0, 50, 200, 100])


# ----------------------------------------------------------------------------- refer

def test_refer_precision_strict_threshold():
  pred = np.array([[0.0, 0.0, 0.5, 0.5],     # identical: IoU 1, hit
                   [0.0, 0.0, 0.5, 0.25],    # GT is half of it: IoU exactly 0.5, a MISS
                   [0.0, 0.0, 0.2, 0.2],     # IoU 1/7, miss
                   [0.0, 0.0, 1.0, 1.0]])    # GT covers 60%: IoU 0.6, hit
  gt = np.array([[0.0, 0.0, 0.5, 0.5],
                 [0.0, 0.0, 0.25, 0.25],
                 [0.1, 0.1, 0.3, 0.3],
                 [0.0, 0.0, 1.0, 0.6]])
  scores = refer.refer_precision(pred, gt)
  assert scores.precision == 0.5
  assert scores.count == 4
  np.testing.assert_allclose(scores.mean_iou, (1 + 0.5 + 1 / 7 + 0.6) / 4, rtol=1e-12)
  # A threshold just under 0.5 turns the exact-0.5 case into a hit.
  assert refer.refer_precision(pred, gt, threshold=0.499).precision == 0.75


def test_refer_precision_rejects_bad_input():
  with pytest.raises(ValueError):
    refer.refer_precision(np.zeros((2, 4)), np.zeros((3, 4)))
  with pytest.raises(ValueError):
    refer.refer_precision(np.zeros((0, 4)), np.zeros((0, 4)))


def test_segmentation_ciou_differs_from_mean_iou():
  # Expression 1: a 10x10 object found exactly (I = U = 100, IoU 1).
  big_gt = np.zeros((20, 20), bool)
  big_gt[5:15, 5:15] = True
  # Expression 2, another image size: a 2x2 object missed by a 1-pixel guess (I = 0, U = 5, IoU 0).
  small_gt = np.zeros((6, 6), bool)
  small_gt[0:2, 0:2] = True
  small_pred = np.zeros((6, 6), bool)
  small_pred[5, 5] = True
  scores = refer.segmentation_scores([big_gt.copy(), small_pred], [big_gt, small_gt])
  np.testing.assert_allclose(scores.ciou, 100 / 105, rtol=1e-12)
  assert scores.mean_iou == 0.5
  assert scores.precision == 0.5
  assert refer.mask_intersection_union(small_pred, small_gt) == (0, 5)


# ----------------------------------------------------------------------------- trace

def _trace_example():
  """Two images plus one without any ground truth; expected values worked out below."""
  image_a_pred = np.array([[[0.1, 0.1], [0.5, 0.2]],   # token 0
                           [[0.9, 0.9], [0.9, 0.9]],   # token 1: no GT, excluded
                           [[0.5, 0.5], [0.5, 0.5]]])  # token 2
  image_a_gt = np.array([[[0.0, 0.0], [0.6, 0.4]],
                         [[0.0, 0.0], [0.0, 0.0]],
                         [[0.3, 0.5], [0.3, 0.5]]])
  # token 0: (0.1, 0.1) -> min(mean(.1, .1), mean(.5, .3)) = 0.1;
  #          (0.5, 0.2) -> min(mean(.5, .2), mean(.1, .2)) = 0.15; token = 0.125.
  # token 2: both points mean(.2, 0) = 0.1.          image A = (0.125 + 0.1) / 2 = 0.1125.
  image_b_pred = np.full((1, 1, 2, 2), 0.9)  # [N=1, L=1, P=2, 2]
  image_b_gt = np.full((1, 1, 2, 2), 0.1)    # image B = 0.8
  image_c_pred = np.full((2, 2, 2), 0.5)
  image_c_gt = np.zeros((2, 2, 2))           # no GT at all: image skipped
  return [image_a_pred, image_b_pred, image_c_pred], [image_a_gt, image_b_gt, image_c_gt]


def test_token_and_image_point_l1():
  preds, gts = _trace_example()
  np.testing.assert_allclose(trace.token_point_l1(preds[0], gts[0])[[0, 2]], [0.125, 0.1])
  np.testing.assert_array_equal(trace.gt_present(gts[0]), [True, False, True])
  np.testing.assert_allclose(trace.image_point_l1(preds[0], gts[0]), 0.1125)
  np.testing.assert_allclose(
      trace.image_point_l1(preds[0], gts[0], token_mask=np.array([True, True, False])), 0.125)
  assert np.isnan(trace.image_point_l1(preds[2], gts[2]))


def test_point_l1_averages_images_not_tokens():
  preds, gts = _trace_example()
  np.testing.assert_allclose(trace.point_l1(preds, gts), (0.1125 + 0.8) / 2)
  # Pooling tokens instead would give (0.125 + 0.1 + 0.8) / 3; make sure we are not doing that.
  assert abs(trace.point_l1(preds, gts) - (0.125 + 0.1 + 0.8) / 3) > 0.1
  assert np.isnan(trace.point_l1(preds[2:], gts[2:]))


def test_pointing_accuracy():
  box = [0.2, 0.2, 0.6, 0.6]
  pred = np.array([[[0.1, 0.1], [0.5, 0.5]],   # midpoint (0.3, 0.3) inside: hit
                   [[0.6, 0.6], [0.6, 0.6]],   # on the corner: inclusive hit
                   [[0.0, 0.0], [0.2, 1.0]],   # midpoint (0.1, 0.5) outside: miss
                   [[0.0, 0.0], [0.0, 0.0]]])  # names no object: ignored
  boxes_ = np.array([box] * 4)
  names_object = np.array([True, True, True, False])
  np.testing.assert_allclose(trace.pointing_accuracy(pred, boxes_, names_object), 2 / 3)
  assert trace.pointing_accuracy(pred, boxes_) == 0.5
  single = np.array([[[0.6, 0.61]]])  # P = 1, just below the box
  assert trace.pointing_accuracy(single, np.array([box])) == 0.0
  assert np.isnan(trace.pointing_accuracy(pred, boxes_, np.zeros(4, bool)))


# ----------------------------------------------------------------------------- captions

REFS = {1: ["A man riding a horse.", "a person on a horse"],
        2: ["Two dogs play in the snow!"],
        3: ["a red t-shirt on a chair"],
        4: ["a plate of food"]}


def test_normalize_caption():
  assert captioning.normalize_caption("  A Red   BALL.\n") == "a red ball"
  assert captioning.normalize_caption("the dog's toy, isn’t it?") == "the dogs toy isnt it"
  assert captioning.normalize_caption("a t-shirt (blue)_x") == "a t shirt blue x"


def test_exact_match():
  predictions = {1: "a person on a horse!", 2: "two dogs play in snow", 3: "A red T-shirt on a chair",
                 4: "a plate of food"}
  assert captioning.exact_match(predictions, REFS) == 0.75


def test_cider_matches_pycocoevalcap_on_hand_tokenized_text():
  predictions = {1: "A man rides a horse.", 2: "Dogs in the snow", 3: "a red shirt", 4: "Food!"}
  hand_tokenized_gts = {1: ["a man riding a horse", "a person on a horse"],
                        2: ["two dogs play in the snow"],
                        3: ["a red t shirt on a chair"],
                        4: ["a plate of food"]}
  hand_tokenized_res = {1: ["a man rides a horse"], 2: ["dogs in the snow"], 3: ["a red shirt"],
                        4: ["food"]}
  expected, _ = Cider().compute_score(hand_tokenized_gts, hand_tokenized_res)
  assert captioning.cider(predictions, REFS) == pytest.approx(expected, rel=1e-12)
  assert 0.0 < expected < 10.0


def test_cider_identical_beats_disjoint():
  identical = {key: refs[0] for key, refs in REFS.items()}
  disjoint = {key: "zebra umbrella quantum" for key in REFS}
  high = captioning.cider(identical, REFS)
  assert high > 1.0  # coco-caption scale: a perfect caption scores several units
  assert captioning.cider(disjoint, REFS) == 0.0


def test_rouge_and_bleu_hand_values():
  refs = {"x": ["a c e"], "y": ["one two three four"]}
  # x: LCS("a b c d", "a c e") = 2, P = 1/2, R = 2/3, beta = 1.2 -> (1 + b^2) P R / (R + b^2 P).
  p, r, b2 = 0.5, 2 / 3, 1.2 ** 2
  rouge_x = (1 + b2) * p * r / (r + b2 * p)
  preds = {"x": "a b c d", "y": "one two three four"}  # y is exact: 1.0
  np.testing.assert_allclose(captioning.rouge_l(preds, refs), (rouge_x + 1.0) / 2, rtol=1e-12)
  identical = {"x": "a c e", "y": "one two three four"}
  np.testing.assert_allclose(captioning.bleu(identical, refs), [1.0] * 4, atol=1e-6)
  # BLEU-1 for preds: clipped unigram matches (2 + 4) / 8 hypothesis words, no brevity penalty.
  np.testing.assert_allclose(captioning.bleu(preds, refs)[0], 6 / 8, atol=1e-6)


def test_mismatched_ids_raise():
  with pytest.raises(ValueError, match="differ"):
    captioning.cider({1: "a"}, {2: ["a"]})
  with pytest.raises(ValueError, match="non-empty"):
    captioning.cider({1: "a"}, {1: []})


def test_meteor_without_java_raises_clearly(monkeypatch):
  monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
  with pytest.raises(RuntimeError, match="Java"):
    captioning.meteor({1: "a"}, {1: ["a"]})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_and_caption_scores():
  """The one test that starts a JVM (~14 s)."""
  predictions = {1: "a man riding a horse", 2: "zebra umbrella", 3: "a red t-shirt on a chair",
                 4: "a plate of food"}
  scores = captioning.caption_scores(predictions, REFS, with_meteor=True)
  assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "METEOR",
                         "exact_match"}
  assert 0.5 < scores["METEOR"] < 1.0  # three exact captions, one disjoint
  assert scores["exact_match"] == 0.75
