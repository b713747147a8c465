"""Metrics against hand-computed values (box IoU, refer P@0.5, cIoU, trace L1, pointing, BLEU, ROUGE-L,\nCIDEr-D, METEOR) and the caption metrics against the COCO caption toolkit itself."""
import json
import shutil
import types

import numpy as np
import pytest

from pixelllm_jax import tasks
from pixelllm_jax.metrics import boxes, captioning, java_tools, refer, trace


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


def test_refer_precision_same_in_pixels():
  # The hand case above on a 640 x 480 image: IoU is scale-invariant, so P@0.5 and mean IoU hold.
  pred = np.array([[0.0, 0.0, 0.5, 0.25], [0.1, 0.2, 0.6, 0.7]])
  gt = np.array([[0.0, 0.0, 0.25, 0.25], [0.1, 0.2, 0.6, 0.7]])  # IoU 0.5 (a miss), 1 (a hit)
  for scale in (1.0, np.array([640, 480, 640, 480])):
    scores = refer.refer_precision(pred * scale, gt * scale)
    assert scores.precision == 0.5
    np.testing.assert_allclose(scores.mean_iou, 0.75, rtol=1e-12)


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
# The toolkit's own numbers need Java (PTB tokenizer and METEOR jars); scripts/test.sh installs it.
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="Java missing: scripts/test.sh installs default-jre-headless")


@needs_java
def test_ptb_tokenization_is_the_toolkits():
  tokenized = java_tools.ptb_tokenize({
      1: ["A man's red T-shirt, isn't it?", "Two dogs (big) play... in the snow!"],
      "x": ["", "café au lait"]})
  # Lower case, clitics split, hyphens kept, the toolkit's punctuation list dropped; its list has
  # "-LRB-" in upper case only, so the lower-cased bracket tokens stay (as in the toolkit).
  assert tokenized == {1: ["a man 's red t-shirt is n't it", "two dogs -lrb- big -rrb- play in the snow"],
                       "x": ["", "café au lait"]}


@needs_java
def test_ptb_keeps_captions_on_their_ids_across_line_breaks():
  # Java ends a line at \r and U+2028; the toolkit alone would move "b" onto id 2 and lose id 3.
  tokenized = java_tools.ptb_tokenize({1: ["a\rb"], 2: ["x\u2028y"], 3: ["end"]})
  assert tokenized == {1: ["a b"], 2: ["x y"], 3: ["end"]}


@needs_java
def test_bleu_hand_values():
  references = {"a": ["a man is riding a horse", "a person rides a brown horse"],
                "b": ["two dogs play in the snow"]}
  predictions = {"a": "a man is riding a brown horse", "b": "two dogs"}
  # Clipped n-gram matches / n-grams of the predictions, pooled over the corpus:
  #   1-grams: a: a x2, man, is, riding, brown, horse: 7/7; b: two, dogs: 2/2       -> 9/9
  #   2-grams: a: a man, man is, is riding, riding a (ref 1), a brown, brown horse (ref 2): 6/6;
  #            b: two dogs 1/1                                                       -> 7/7
  #   3-grams: a: a man is, man is riding, is riding a, a brown horse; not riding a brown: 4/5
  #   4-grams: a: a man is riding, man is riding a; not is riding a brown, riding a brown horse: 2/4
  # Brevity: prediction lengths 7 + 2 = 9, closest reference lengths 6 + 6 = 12 -> exp(1 - 12/9).
  # BLEU-n = brevity * (p1 ... pn)^(1/n).
  brevity = np.exp(1 - 12 / 9)
  expected = [brevity, brevity, brevity * 0.8 ** (1 / 3), brevity * 0.4 ** (1 / 4)]
  # The toolkit adds 1e-15 to every match count and 1e-9 to every denominator: rel. error ~1e-10.
  np.testing.assert_allclose(captioning.bleu(predictions, references), expected, rtol=1e-8)


@needs_java
def test_rouge_l_hand_values():
  refs = {"x": ["a c e", "a d"], "y": ["one two three four"]}
  # x: LCS("a b c d", "a c e") = 2: P = 2/4, R = 2/3; LCS("a b c d", "a d") = 2: P = 2/4, R = 2/2.
  # The toolkit takes the best P and the best R over the references (here from different ones),
  # then F = (1 + b^2) P R / (R + b^2 P) with beta = 1.2.
  p, r, b2 = 0.5, 1.0, 1.2 ** 2
  rouge_x = (1 + b2) * p * r / (r + b2 * p)
  preds = {"x": "a b c d", "y": "One two three four."}  # y is exact once tokenized: 1.0
  np.testing.assert_allclose(captioning.rouge_l(preds, refs), (rouge_x + 1.0) / 2, rtol=1e-12)


@needs_java
def test_cider_d_clipping_and_length_penalty_by_hand():
  # Two images, so an n-gram in the references of one image only has idf log(2 / 1) = g, and an
  # n-gram in no reference has idf log(2 / max(1, 0)) = g too; tf-idf = count * g.
  references = {1: ["red ball"], 2: ["blue sky"]}
  predictions = {1: "red red red ball", 2: "blue sky"}
  # Image 1, unigrams: prediction (red 3g, ball g), |.| = g sqrt(10); reference (red g, ball g),
  #   |.| = g sqrt(2). Clipping: sum min(pred, ref) * ref = g^2 (red, clipped from 3g^2) + g^2 (ball),
  #   cosine 2 / sqrt(20) (unclipped it would be 4 / sqrt(20)).
  # Bigrams: prediction (red red 2g, red ball g), |.| = g sqrt(5); reference (red ball g):
  #   cosine 1 / sqrt(5). 3- and 4-grams: the reference has none: 0.
  # Length penalty: lengths count bigrams, 3 vs 1: exp(-2^2 / (2 * 6^2)) = exp(-1/18).
  # CIDEr-D = 10 * mean over n (one reference) = 10 * (2 / sqrt(20) + 1 / sqrt(5)) / 4 * exp(-1/18)
  #         = sqrt(5) * exp(-1/18).
  image_1 = np.sqrt(5) * np.exp(-1 / 18)
  image_2 = 10 * (1 + 1 + 0 + 0) / 4  # exact two-word caption: 1- and 2-gram cosines 1, no 3/4-grams
  np.testing.assert_allclose(captioning.cider(predictions, references), (image_1 + image_2) / 2,
                             rtol=1e-12)
  # With several references the per-reference scores are averaged: adding a copy of the first
  # reference changes nothing, adding a disjoint one halves image 1's score.
  np.testing.assert_allclose(
      captioning.cider(predictions, {1: ["red ball", "red ball"], 2: ["blue sky"]}),
      (image_1 + image_2) / 2, rtol=1e-12)


@needs_java
def test_meteor_hand_cases_and_best_reference():
  references = {1: ["a man riding a horse"], 2: ["two dogs in the snow"]}
  assert captioning.meteor({1: "A man riding a horse.", 2: "Two dogs in the snow"},
                           references) == 1.0  # identical once tokenized: no fragmentation penalty
  assert captioning.meteor({1: "zebra umbrella", 2: "quantum violin"}, references) == 0.0
  # METEOR scores against the best-matching reference: a prediction equal to one of five is 1.
  five = {1: ["a cat on a mat", "a dog", "the sky is blue", "a red car", "a man riding a horse"]}
  assert captioning.meteor({1: "a man riding a horse"}, five) == 1.0


@needs_java
def test_exact_match_on_tokenized_text():
  refs = {1: ["A man riding a horse.", "a person on a horse"], 2: ["Two dogs play in the snow!"],
          3: ["a red t-shirt on a chair"], 4: ["a plate of food"]}
  predictions = {1: "a person on a horse!", 2: "two dogs play in snow", 3: "A red T-shirt on a chair",
                 4: "a plate of food"}
  assert captioning.exact_match(predictions, refs) == 0.75


class _StubSpice:
  """SPICE would download Stanford CoreNLP models; it is not one of our metrics."""

  def compute_score(self, gts, res):
    return 0.0, [0.0] * len(res)

  def method(self):
    return "SPICE"


class _CaptionSet:
  """The two attributes of pycocotools' COCO that COCOEvalCap reads."""

  def __init__(self, captions):
    self.imgToAnns = {i: [{"image_id": i, "caption": c} for c in caps] for i, caps in captions.items()}

  def getImgIds(self):  # pylint: disable=invalid-name
    return list(self.imgToAnns)


TOOLKIT_REFERENCES = {
    11: ["A man riding a wave on top of a surfboard.", "A surfer rides the large wave in the ocean!",
         "a man on a surf board riding a wave", "A person's surfing on a wave (a big one).",
         "Surfer riding a wave, don't fall."],
    12: ["A boy in a red T-shirt plays frisbee.", "A kid throws a frisbee in the park",
         "Young boy in red shirt with a frisbee", "The child's frisbee is red.",
         "a boy, a frisbee and a tree"],
    13: ["Two dogs play in the snow!"],
    14: ["A plate of food with broccoli.", "Broccoli and rice on a white plate", "a dish of food"],
    15: ["A clock tower in the city", "The tall tower's clock reads 3:45."],
}
TOOLKIT_PREDICTIONS = {11: "A man riding a wave on a surfboard.",
                       12: "a boy in a red t-shirt throwing a frisbee",
                       13: "Dogs playing in the snow", 14: "A plate of broccoli and rice.",
                       15: "The clock's tower..."}


@needs_java
def test_scores_equal_coco_eval_cap(monkeypatch):
  """Our wrapper against pycocoevalcap's COCOEvalCap itself (PTB, all 5 references per image)."""
  from pycocoevalcap import eval as coco_eval  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(coco_eval, "Spice", _StubSpice)
  # The toolkit's Meteor() on the JVM our wrapper keeps (one start of ~10-20 s instead of two): the
  # same class and jar, whose answers depend only on each line sent.
  monkeypatch.setattr(coco_eval, "Meteor", java_tools.meteor_scorer)
  toolkit = coco_eval.COCOEvalCap(
      _CaptionSet(TOOLKIT_REFERENCES),
      _CaptionSet({i: [c] for i, c in TOOLKIT_PREDICTIONS.items()}))
  toolkit.evaluate()
  expected = {k: v for k, v in toolkit.eval.items() if k != "SPICE"}

  ours = captioning.caption_scores(TOOLKIT_PREDICTIONS, TOOLKIT_REFERENCES)
  assert ours == expected  # exactly: the same tokens, scorers and order
  assert 0.2 < ours["METEOR"] < 0.6 and 0.5 < ours["CIDEr"] < 5.0
  # The test can tell tokenizations apart: the offline rule gives other numbers on this set.
  offline = captioning.caption_scores(TOOLKIT_PREDICTIONS, TOOLKIT_REFERENCES,
                                      tokenization="offline", meteor=False)
  assert offline["CIDEr"] != ours["CIDEr"]
  # And it can tell all references from one: scoring against the first reference only differs.
  first_only = {i: refs[:1] for i, refs in TOOLKIT_REFERENCES.items()}
  assert captioning.caption_scores(TOOLKIT_PREDICTIONS, first_only)["METEOR"] != ours["METEOR"]


def test_without_java_fails_naming_the_package_unless_asked_offline(monkeypatch):
  monkeypatch.setattr(java_tools.shutil, "which", lambda name: None)
  for call in (lambda: captioning.caption_scores({1: "a"}, {1: ["a"]}),
               lambda: captioning.caption_scores({1: "a"}, {1: ["a"]}, tokenization="offline"),
               lambda: captioning.cider({1: "a"}, {1: ["a"]}),
               lambda: captioning.meteor({1: "a"}, {1: ["a"]}, tokenization="offline")):
    with pytest.raises(java_tools.JavaNotFound, match="default-jre-headless"):
      call()
  # The explicit opt-out runs without Java, on the offline rule.
  scores = captioning.caption_scores({1: "A red T-shirt.", 2: "zebra"},
                                     {1: ["a red t shirt"], 2: ["dog"]},
                                     tokenization="offline", meteor=False, exact_match=True)
  assert "METEOR" not in scores and scores["exact_match"] == 0.5
  # 4 of the 5 unigrams match; lengths 4 + 1 equal the references': no brevity penalty.
  assert scores["Bleu_1"] == pytest.approx(4 / 5, rel=1e-8)


def test_settings_from_env(monkeypatch):
  monkeypatch.delenv(captioning.ENV_VAR, raising=False)
  assert captioning.settings_from_env() == {"tokenization": "ptb", "meteor": True}
  monkeypatch.setenv(captioning.ENV_VAR, "offline")
  assert captioning.settings_from_env() == {"tokenization": "offline", "meteor": False}
  monkeypatch.setenv(captioning.ENV_VAR, "ptb")
  with pytest.raises(ValueError, match="toolkit"):
    captioning.settings_from_env()


def test_normalize_caption():
  assert captioning.normalize_caption("  A Red   BALL.\n") == "a red ball"
  assert captioning.normalize_caption("the dog's toy, isn’t it?") == "the dogs toy isnt it"
  assert captioning.normalize_caption("a t-shirt (blue)_x") == "a t shirt blue x"


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="differ"):
    captioning.cider({1: "a"}, {2: ["a"]}, tokenization="offline")
  with pytest.raises(ValueError, match="non-empty"):
    captioning.cider({1: "a"}, {1: []}, tokenization="offline")
  with pytest.raises(ValueError, match="no captions"):
    captioning.cider({}, {}, tokenization="offline")
  with pytest.raises(ValueError, match="tokenization"):
    captioning.cider({1: "a"}, {1: ["a"]}, tokenization="nltk")


# ----------------------------------------------------------------------------- caption tasks

class _WordTokenizer:
  words = {3: "small", 4: "red", 5: "circle", 6: "square", 7: "a"}

  def decode(self, ids):
    return " ".join(self.words[i] for i in ids if i in self.words)


def _eval_context(tmp_path, tokens):
  """A context whose model decodes `tokens` int32[B, S, L] (the caption tasks read only tokens)."""
  predictions = types.SimpleNamespace(tokens=tokens)
  return tasks.base.EvalContext(
      teacher_forced=lambda batch: predictions, generate=lambda batch: predictions,
      tokenizer=_WordTokenizer(), out_dir=str(tmp_path), num_visualizations=0)


@needs_java
def test_caption_task_scores_each_image_once_against_all_its_references(tmp_path, monkeypatch):
  monkeypatch.delenv(captioning.ENV_VAR, raising=False)
  # Image 7's five captions are five slots over two rows (as with 4 slots per row); image 8 has one.
  tokens = np.array([[[7, 4, 5, 1], [7, 4, 5, 1], [7, 4, 5, 1], [7, 4, 5, 1]],
                     [[7, 4, 5, 1], [3, 6, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]], np.int32)
  refs_7 = ["A red circle.", "a small red circle", "red circle", "the circle is red", "a red ring"]
  metas = [(0, s, {"image_id": 7, "reference": refs_7[s]}) for s in range(4)]
  metas += [(1, 0, {"image_id": b"7", "reference": refs_7[4]}),
            (1, 1, {"image_id": 8, "reference": "a small square"})]
  metrics = tasks.get("caption").evaluate(_eval_context(tmp_path, tokens), [({}, metas)])

  expected = captioning.caption_scores({7: "a red circle", 8: "small square"},
                                       {7: refs_7, 8: ["a small square"]})
  assert metrics == {"caption_count": 2, "caption_cider": expected["CIDEr"],
                     "caption_meteor": expected["METEOR"], "caption_bleu4": expected["Bleu_4"],
                     "caption_rouge_l": expected["ROUGE_L"]}
  rows = [json.loads(line) for line in open(tmp_path / "predictions_caption.jsonl")]
  assert rows == [{"image_id": 7, "prediction": "a red circle", "references": refs_7},
                  {"image_id": 8, "prediction": "small square", "references": ["a small square"]}]


def _assert_scored_item_by_item(metrics, task, predictions, references, exact_match):
  """`task`'s metrics are the caption toolkit's scores of each item against its own references
  alone (item keys, not images), with the exact-match rate given."""
  expected = captioning.caption_scores(predictions, references, exact_match=True)
  assert metrics[f"{task}_count"] == len(predictions)
  assert metrics[f"{task}_exact_match"] == exact_match
  for name, key in (("cider", "CIDEr"), ("meteor", "METEOR"), ("bleu4", "Bleu_4"),
                    ("rouge_l", "ROUGE_L")):
    assert metrics[f"{task}_{name}"] == expected[key], name


@needs_java
def test_loca_task_scores_every_region(tmp_path, monkeypatch):
  monkeypatch.delenv(captioning.ENV_VAR, raising=False)
  tokens = np.array([[[3, 4, 5, 1], [3, 4, 6, 1], [3, 4, 5, 1]]], np.int32)
  box = np.array([0.0, 0.0, 0.5, 0.5], np.float32)
  # Regions 1 and 2 share a box (VG repeats boxes): still two items, each with its own phrase.
  metas = [(0, 0, {"image_id": 5, "region_id": 1, "reference": "small red circle", "box": box}),
           (0, 1, {"image_id": 5, "region_id": 2, "reference": "small red circle", "box": box}),
           (0, 2, {"image_id": 5, "region_id": 3, "reference": "big blue circle",
                   "box": np.array([0.5, 0.5, 1.0, 1.0], np.float32)})]
  metrics = tasks.get("loca").evaluate(_eval_context(tmp_path, tokens), [({}, metas)])
  predictions = {0: "small red circle", 1: "small red square", 2: "small red circle"}
  references = {0: ["small red circle"], 1: ["small red circle"], 2: ["big blue circle"]}
  _assert_scored_item_by_item(metrics, "loca", predictions, references, exact_match=1 / 3)
  rows = [json.loads(line) for line in open(tmp_path / "predictions_loca.jsonl")]
  assert [(r["region_id"], r["prediction"], r["references"]) for r in rows] == [
      (1, "small red circle", ["small red circle"]), (2, "small red square", ["small red circle"]),
      (3, "small red circle", ["big blue circle"])]


@needs_java
def test_refer_loca_scores_every_expression_against_itself_alone(tmp_path, monkeypatch):
  monkeypatch.delenv(captioning.ENV_VAR, raising=False)
  # Expressions 11 and 12 refer to one object (one box, one decoded caption): still two items,
  # each scored against its own expression only (official RefCOCOg loca: no merging).
  tokens = np.array([[[3, 4, 5, 1], [3, 4, 5, 1], [3, 4, 6, 1]]], np.int32)
  box = np.array([0.0, 0.0, 0.5, 0.5], np.float32)
  metas = [(0, 0, {"image_id": 5, "sent_id": 11, "reference": "small red circle", "box": box}),
           (0, 1, {"image_id": 5, "sent_id": 12, "reference": "the red one", "box": box}),
           (0, 2, {"image_id": 5, "sent_id": 13, "reference": "small red square",
                   "box": np.array([0.5, 0.5, 1.0, 1.0], np.float32)})]
  metrics = tasks.get("refer_loca").evaluate(_eval_context(tmp_path, tokens), [({}, metas)])
  predictions = {0: "small red circle", 1: "small red circle", 2: "small red square"}
  references = {0: ["small red circle"], 1: ["the red one"], 2: ["small red square"]}
  _assert_scored_item_by_item(metrics, "refer_loca", predictions, references,
                              exact_match=2 / 3)


def test_caption_task_offline_opt_out_runs_without_java(tmp_path, monkeypatch):
  monkeypatch.setattr(java_tools.shutil, "which", lambda name: None)
  monkeypatch.delenv(captioning.ENV_VAR, raising=False)
  tokens = np.array([[[7, 3, 4, 5, 1]]], np.int32)
  metas = [(0, 0, {"image_id": 1, "reference": "A small red circle."})]
  with pytest.raises(java_tools.JavaNotFound, match=captioning.ENV_VAR):
    tasks.get("caption").evaluate(_eval_context(tmp_path, tokens), [({}, metas)])
  monkeypatch.setenv(captioning.ENV_VAR, "offline")
  metrics = tasks.get("caption").evaluate(_eval_context(tmp_path, tokens), [({}, metas)])
  assert metrics["caption_count"] == 1 and "caption_meteor" not in metrics
  assert metrics["caption_bleu4"] == pytest.approx(1.0, rel=1e-8)
