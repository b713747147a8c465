"""Dense captioning mAP (metrics/densecap.py) on hand-built cases whose mAP is computed by hand below.

Notation: per case, the detections in score order as tp / fp, then recall (tp / positives) and
precision (tp / (tp + fp)) after each. AP = mean over 100 recall levels of the best precision at
recall >= level. Lua's levels are the sums 0, 0.01, ... and its 51st is 0.5000000000000002 > 0.5, so a
recall of 1/2 reaches levels 1..50 only (50 levels); the "scenic" levels k / 100 reach 0.5 (51 levels).
"""
import shutil

import numpy as np
import pytest

from pixelllm_jax.metrics import densecap
from pixelllm_jax.metrics.densecap import ImageRegions

TOL = 1e-12


def exact_meteor(candidates, references):
  """A hand-made METEOR: 1 if the caption is one of its references, else 0."""
  return [1.0 if c in refs else 0.0 for c, refs in zip(candidates, references)]


def fixed_meteor(table, calls):
  """METEOR looked up by caption; records what was scored against what."""
  def meteor_fn(candidates, references):
    calls.extend(zip(candidates, map(list, references)))
    return [table[c] for c in candidates]
  return meteor_fn


def image(boxes, scores, captions, gt_boxes, gt_captions):
  return ImageRegions(np.array(boxes, float).reshape(-1, 4), np.array(scores, float), captions,
                      np.array(gt_boxes, float).reshape(-1, 4), gt_captions)


def all_caption_aps(result):
  return [result[densecap.ap_key(t, m)]
          for t in densecap.IOU_THRESHOLDS for m in densecap.METEOR_THRESHOLDS]


def test_recall_levels_of_the_lua_loop():
  lua = densecap.RECALL_LEVELS["lua"]
  assert len(lua) == 100 and lua[0] == 0.0 and abs(lua[-1] - 0.99) < 1e-12
  assert lua[50] > 0.5 and lua[49] < 0.5          # 0.5000000000000002
  assert lua[30] > 0.3 and lua[10] < 0.1          # 0.30000000000000004, 0.09999999999999999
  np.testing.assert_array_equal(densecap.RECALL_LEVELS["scenic"], [k / 100 for k in range(100)])


def test_perfect_predictions_score_one():
  # Every ground-truth box detected exactly with its own caption: tp at every threshold pair,
  # precision 1 up to recall 1, so every AP is 1.
  a, b, c = [0, 0, 10, 10], [20, 0, 30, 10], [5, 5, 50, 40]
  images = [image([b, a], [0.2, 0.9], ["a dog", "a cat"], [a, b], ["a cat", "a dog"]),
            image([c], [0.5], ["a tree"], [c], ["a tree"])]
  result = densecap.densecap_map(images, exact_meteor)
  assert result["map"] == 1.0 and result["detmap"] == 1.0
  assert result["num_positives"] == 3 and result["num_detections"] == 3


def test_two_boxes_three_detections():
  # Ground truth A = [0,0,10,10], B = [20,0,30,10] (disjoint, area 100 each): 2 positives.
  #   d1 score .9 [0,0,10,5]: IoU with A 50/100 = 0.5, METEOR 0.3.
  #   d2 score .8 = B: IoU 1, METEOR 0.12.
  #   d3 score .7 [0,0,10,8]: IoU with A 0.8, but A is used by d1: fp everywhere.
  # d1 tp iff t <= 0.5 (0.3 > every m); d2 tp iff 0.12 > m (m in 0, 0.05, 0.1).
  #   t <= .5, m <= .1 (9 pairs): tp tp fp; rec .5 1 1, prec 1 1 2/3 -> AP 1.
  #   t <= .5, m >= .15 (9): tp fp fp; rec .5 .5 .5, prec 1 ..  -> lua 50 levels x 1 = 0.5
  #   t >= .6, m <= .1 (6): fp tp fp; rec 0 .5 .5, prec 0 .5 1/3 -> lua 50 x .5 / 100 = 0.25
  #   t >= .6, m >= .15 (6): fp fp fp -> 0.
  # lua mAP = (9 x 1 + 9 x .5 + 6 x .25) / 30 = 15 / 30 = 0.5;
  #   detmap (m = -1): t <= .5 -> 1 (3 APs), t >= .6 -> .25 (2): 3.5 / 5 = 0.7.
  # scenic (51 levels reach recall .5): .51 and .255: mAP (9 + 4.59 + 1.53) / 30 = 0.504,
  #   detmap (3 + .51) / 5 = 0.702.
  a, b = [0, 0, 10, 10], [20, 0, 30, 10]
  regions = image([[0, 0, 10, 8], [0, 0, 10, 5], b], [0.7, 0.9, 0.8], ["d3", "d1", "d2"],
                  [a, b], ["box a", "box b"])
  calls = []
  result = densecap.densecap_map([regions], fixed_meteor({"d1": 0.3, "d2": 0.12}, calls))
  # Only d1 and d2 are scored, each against its own box's references; d3 is never ok.
  assert sorted(calls) == [("d1", ["box a"]), ("d2", ["box b"])]
  assert result["map"] == pytest.approx(0.5, abs=TOL)
  assert result["detmap"] == pytest.approx(0.7, abs=TOL)
  assert result["ap_iou0.5_meteor0.1"] == pytest.approx(1.0, abs=TOL)
  assert result["ap_iou0.4_meteor0.15"] == pytest.approx(0.5, abs=TOL)
  assert result["ap_iou0.6_meteor0"] == pytest.approx(0.25, abs=TOL)
  assert result["ap_iou0.7_meteor0.25"] == 0.0
  assert result["det_ap_iou0.6"] == pytest.approx(0.25, abs=TOL)

  scenic = densecap.densecap_map([regions], fixed_meteor({"d1": 0.3, "d2": 0.12}, []),
                                 protocol="scenic")
  assert scenic["map"] == pytest.approx(0.504, abs=TOL)
  assert scenic["detmap"] == pytest.approx(0.702, abs=TOL)


def test_boxes_at_iou_08_merge_into_one_with_both_captions():
  # G1 = [0,0,10,10] and G2 = [0,0,10,8]: IoU 80 / 100 = 0.8 >= 0.7 -> one box, the mean
  # [0,0,10,9], references ["a car", "a red car"]. G3 far away stays alone.
  g1, g2, g3 = [0, 0, 10, 10], [0, 0, 10, 8], [50, 50, 60, 60]
  merged, refs = densecap.merge_gt_boxes(np.array([g1, g3, g2], float),
                                         ["a car", "a house", "a red car"])
  # Counts at >= .7 (itself included): G1 2, G3 1, G2 2: G1's group is formed first.
  np.testing.assert_array_equal(merged, [[0, 0, 10, 9], g3])
  assert refs == [["a car", "a red car"], ["a house"]]

  # Through the mAP: 2 positives, not 3. A detection on the merged box whose caption is the second
  # reference and one on G3: tp tp -> recall 1, every AP 1. Unmerged it would be 2 / 3 at most.
  regions = image([[0, 0, 10, 9], g3], [0.9, 0.8], ["a red car", "a house"],
                  [g1, g3, g2], ["a car", "a house", "a red car"])
  result = densecap.densecap_map([regions], exact_meteor)
  assert result["num_positives"] == 2 and result["map"] == 1.0


def test_merging_is_greedy_not_transitive():
  # Unit-high boxes along x: A [0,10], B [1,11], C [2,12], D [3,13]. Neighbours share 9 of 11
  # (IoU .818), two apart 8 of 12 (.667), three apart 7 of 13 (.538). Counts at >= .7 with itself:
  # A 2, B 3, C 3, D 2 -> B first (lowest index of the largest): {A, B, C}, mean [1,0,11,1]; then D.
  chain = np.array([[0, 0, 10, 1], [1, 0, 11, 1], [2, 0, 12, 1], [3, 0, 13, 1]], float)
  merged, refs = densecap.merge_gt_boxes(chain, ["a", "b", "c", "d"])
  np.testing.assert_allclose(merged, [[1, 0, 11, 1], [3, 0, 13, 1]], rtol=0, atol=TOL)
  assert refs == [["a", "b", "c"], ["d"]]


def test_zero_area_ground_truth():
  # Lua sets the IoU diagonal to 1: a zero-area box is its own group and a positive no detection can
  # match. Scenic's diagonal is the IoU (0 for it): the box is dropped.
  gt = np.array([[0, 0, 10, 10], [5, 5, 5, 8]], float)
  assert len(densecap.merge_gt_boxes(gt, ["a", "b"])[0]) == 2
  assert densecap.merge_gt_boxes(gt, ["a", "b"], protocol="scenic")[1] == [["a"]]


def test_iou_065_counts_for_thresholds_up_to_06_only():
  # Ground truth [0,0,100,100]; the detection [0,0,100,65]: IoU 6500 / 10000 = 0.65, caption right.
  # t <= .6 (4 x 6 pairs): tp, AP 1; t = .7 (6 pairs): fp, AP 0. mAP = 24 / 30 = 0.8.
  regions = image([[0, 0, 100, 65]], [1.0], ["a wall"], [[0, 0, 100, 100]], ["a wall"])
  result = densecap.densecap_map([regions], exact_meteor)
  for m in densecap.METEOR_THRESHOLDS:
    assert result[densecap.ap_key(0.6, m)] == 1.0
    assert result[densecap.ap_key(0.7, m)] == 0.0
  assert result["map"] == pytest.approx(0.8, abs=TOL)
  assert result["det_ap_iou0.6"] == 1.0 and result["det_ap_iou0.7"] == 0.0


def test_meteor_threshold_is_strict():
  # One box found exactly (IoU 1). METEOR 0.05: tp at m = 0 only (0.05 > 0.05 is false): AP 1 in
  # the 5 pairs with m = 0, 0 in the other 25: mAP 5 / 30 = 1/6. METEOR 0: fp at every m >= 0,
  # tp with m = -1: mAP 0, detmap 1.
  box = [0, 0, 10, 10]
  regions = image([box], [1.0], ["c"], [box], ["r"])
  result = densecap.densecap_map([regions], fixed_meteor({"c": 0.05}, []))
  assert result["ap_iou0.7_meteor0"] == 1.0 and result["ap_iou0.3_meteor0.05"] == 0.0
  assert result["map"] == pytest.approx(1 / 6, abs=TOL)
  result = densecap.densecap_map([regions], fixed_meteor({"c": 0.0}, []))
  assert result["map"] == 0.0 and result["detmap"] == 1.0


def test_duplicate_detections_are_false_positives():
  # A = [0,0,10,10], B = [10,0,20,10], captions right everywhere.
  #   d1 .9 [0,0,10,8]: IoU with A .8 -> tp at every t (all <= .7).
  #   d2 .8 [1,0,11,10]: IoU with A 90/110 = .82, with B 10/190 = .05: best is A, used -> fp (no
  #      fall-back to B, although d2's IoU with A beats d1's).
  #   d3 .7 = B -> tp.
  # tp fp tp: rec .5 .5 1, prec 1 .5 2/3. Lua: 50 levels <= .5 -> 1, 50 levels above -> 2/3:
  # AP = (50 + 50 x 2/3) / 100 = 5/6 in every pair; mAP 5/6.
  a, b = [0, 0, 10, 10], [10, 0, 20, 10]
  regions = image([[0, 0, 10, 8], [1, 0, 11, 10], b], [0.9, 0.8, 0.7], ["x", "x", "y"],
                  [a, b], ["x", "y"])
  result = densecap.densecap_map([regions], exact_meteor)
  np.testing.assert_allclose(all_caption_aps(result), 5 / 6, rtol=0, atol=TOL)
  assert result["map"] == pytest.approx(5 / 6, abs=TOL)

  # A box is used up by the first detection whatever its IoU: d1 at IoU .2 ([0,0,10,2]) takes A,
  # so the exact d2 is not ok. fp fp -> AP 0 everywhere.
  regions = image([[0, 0, 10, 2], a], [0.9, 0.8], ["x", "x"], [a], ["x"])
  result = densecap.densecap_map([regions], exact_meteor)
  assert result["map"] == 0.0 and result["detmap"] == 0.0


def test_images_without_predictions_lower_recall():
  # Image 1: one box, found exactly. Image 2: one box, no detections. 2 positives; tp -> rec .5,
  # prec 1. Lua: 50 levels reach .5 -> AP .5 in every pair; scenic: 51 levels -> .51.
  box = [0, 0, 10, 10]
  images = [image([box], [0.9], ["a cat"], [box], ["a cat"]),
            image([], [], [], [box], ["a dog"])]
  result = densecap.densecap_map(images, exact_meteor)
  assert result["num_positives"] == 2 and result["num_detections"] == 1
  assert result["map"] == pytest.approx(0.5, abs=TOL)
  assert result["detmap"] == pytest.approx(0.5, abs=TOL)
  assert densecap.densecap_map(images, exact_meteor, protocol="scenic")["map"] == pytest.approx(
      0.51, abs=TOL)


def test_detection_overlapping_nothing_uses_the_last_box_in_lua():
  # A = [0,0,10,10], B = [20,0,30,10]; merged in that order, B last.
  #   d1 .9 [50,50,60,60] overlaps nothing: Lua's used[-1] marks B used; fp.
  #   d2 .8 = B: Lua not ok -> fp; scenic tp.   d3 .7 = A: tp.
  # Lua fp fp tp: rec 0 0 .5, prec 0 0 1/3 -> 50 levels x 1/3 / 100 = 1/6.
  # Scenic fp tp tp: rec 0 .5 1, prec 0 .5 2/3 -> 2/3 at every level -> 2/3.
  a, b = [0, 0, 10, 10], [20, 0, 30, 10]
  regions = image([[50, 50, 60, 60], b, a], [0.9, 0.8, 0.7], ["x", "y", "x"], [a, b], ["x", "y"])
  assert densecap.densecap_map([regions], exact_meteor)["map"] == pytest.approx(1 / 6, abs=TOL)
  scenic = densecap.densecap_map([regions], exact_meteor, protocol="scenic")
  assert scenic["map"] == pytest.approx(2 / 3, abs=TOL)


def test_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match="captions"):
    densecap.densecap_map([image([[0, 0, 1, 1]], [1.0], [], [[0, 0, 1, 1]], ["a"])], exact_meteor)
  with pytest.raises(ValueError, match="protocol"):
    densecap.densecap_map([], exact_meteor, protocol="coco")


@pytest.mark.skipif(shutil.which("java") is None,
                    reason="Java missing: scripts/test.sh installs default-jre-headless")
def test_real_meteor_wiring():
  candidates = ["a red car", "blue sky above", "man riding horse"]
  references = [["a red car"], ["a tall tree", "green grass"], ["a man riding a horse"]]
  together = densecap.toolkit_meteor(candidates, references)
  # One EVAL line for all pairs gives each pair's own score (meteor_bridge scores one at a time).
  alone = [densecap.toolkit_meteor([c], [r])[0] for c, r in zip(candidates, references)]
  assert together == alone
  assert together[0] == 1.0 and together[1] == 0.0 and 0.0 < together[2] < 1.0

  # Image 1: A "a red car", B "a tall tree"; d1 .9 = A "a red car" (METEOR 1), d2 .8 = B
  # "blue sky above" (METEOR 0, not > 0). Image 2: two boxes at IoU .8 merged, references
  # ["a white cat", "a red car"]; d3 .7 on the merged box "a red car" (1 against the best reference).
  # 3 positives. m >= 0: tp fp tp, rec 1/3 1/3 2/3, prec 1 .5 2/3: levels <= 1/3 (0 .. .33: 34) -> 1,
  # levels in (1/3, 2/3] (.34 .. .66: 33) -> 2/3: AP (34 + 22) / 100 = 0.56 in every pair.
  # m = -1: tp tp tp -> detmap 1.
  a, b = [0, 0, 10, 10], [20, 0, 30, 10]
  images = [image([a, b], [0.9, 0.8], ["a red car", "blue sky above"], [a, b],
                  ["a red car", "a tall tree"]),
            image([[0, 0, 10, 9]], [0.7], ["a red car"], [[0, 0, 10, 10], [0, 0, 10, 8]],
                  ["a white cat", "a red car"])]
  result = densecap.densecap_map(images)
  np.testing.assert_allclose(all_caption_aps(result), 0.56, rtol=0, atol=TOL)
  assert result["detmap"] == 1.0
