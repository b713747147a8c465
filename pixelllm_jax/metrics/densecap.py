"""Visual Genome dense captioning mAP, as DenseCap defines it (Johnson et al., CVPR 2016).

Source: github.com/jcjohnson/densecap at its last commit: `eval/eval_utils.lua`
(`DenseCaptioningEvaluator:addResult` / `:evaluate`, `pluck_boxes`), `densecap/box_utils.lua`
(`merge_boxes`, `iou_matrix`) and `eval/meteor_bridge.py`. GRiT's evaluator and the official PixelLLM
one (Scenic `densecap_evaluator.py`, class `DensecapEval`) are ports of it; `protocol="scenic"`
follows the latter where it differs (end of this docstring).

Per image (`addResult`):
  1. Ground-truth merging (`merge_boxes(target_boxes, 0.7)` then `pluck_boxes`). The IoU matrix of
     the ground-truth boxes, its diagonal set to 1. Repeat: take the box with the most boxes at
     IoU >= 0.7 (itself included; ties: the lowest index, as torch7's `max`), group it with every box
     at IoU >= 0.7 with IT (not their neighbours in turn: a chain A~B~C~D, where only neighbours reach
     0.7, gives {A, B, C} and {D}), zero the group's rows and columns; stop when no box is left. Each
     group becomes one box, the coordinate-wise mean of its boxes, whose references are the group's
     captions in index order. Merged boxes keep the order their groups were formed in.
  2. Detections sorted by score, descending. Each in turn takes the merged box of highest IoU (ties:
     the first, as `ov > ovmax`) and is `ok` if that box was not used yet; the box is then used. There
     is no fall-back to the next-best unused box, and the box is used up whatever the IoU (a detection
     at IoU 0.1 uses up its box for every later detection).
     A detection that overlaps no merged box has no references and is a false positive everywhere. The
     Lua code then leaves the match index at -1, and `used[-1]` is the LAST element in torch7 (its
     `__index__` / `__newindex__` wrap negative indices), so such a detection marks the last merged box
     used and a later detection whose best box is that one is not ok. Reproduced here. In an image with
     no ground truth the Lua code stops with an error (indexing an empty tensor); here its detections
     are false positives.
  3. The count of positives grows by the number of merged boxes.
Over all images (`evaluate`):
  4. METEOR of each detection's caption against the references of its box, one score per detection
     (`meteor_bridge.py`: METEOR 1.5, `-l en -norm`, one SCORE/EVAL exchange per detection). Here only
     detections that are ok at IoU >= 0.3 are scored: no other score is ever read.
  5. All detections sorted by score, descending (`torch.sort` of the per-image sorted scores).
  6. For each IoU threshold t in (0.3, 0.4, 0.5, 0.6, 0.7) and METEOR threshold m in
     (-1, 0, 0.05, 0.1, 0.15, 0.2, 0.25), a detection is a true positive iff it is ok, IoU >= t and
     METEOR > m (strict: m = 0 needs a positive METEOR; m = -1 is no language condition), otherwise a
     false positive. With cumulative counts, recall = tp / positives and precision = tp / (tp + fp).
     AP = the mean over the recall levels r of the highest precision at recall >= r (0 if none). The
     levels are those of Lua's `for t=0,1,0.01`, whose variable is advanced by adding 0.01: the
     floating-point sums 0, 0.01, 0.02, 0.030000000000000002, ..., 0.9900000000000007, 100 levels (the
     next sum, 1.0000000000000007, passes 1), some a hair off k/100: the 51st is
     0.5000000000000002, so a recall of exactly 1/2 does not reach it.
  7. mAP ("map") = the mean of the 30 APs with m >= 0. "detmap" = the mean of the 5 APs with m = -1
     (detection only). Both on the 0-1 scale; papers print x100 (PixelLLM: 17.5).

Boxes are xyxy with continuous corners (x1 = x0 + width) in any frame shared by detections and
ground truth (pixels or normalized: IoU does not change when an axis is scaled, and a mean of boxes
moves with the frame). The Lua code works on inclusive pixel corners, x1 = xc + (w - 1) / 2 and
x0 = xc - (w - 1) / 2, and adds 1 to every width and height (`iw = min(x1) - max(x0) + 1`); on those
corners that is exactly the continuous IoU of the boxes here (widths w, intersection
min(x0 + w) - max(x0)), and "iw > 0" is "the intersection is not empty". IoU is computed in float64
(`metrics.boxes`); the Lua code first rounds boxes to float32 (`:float()`), which can move an IoU
by about 1e-7 and matters only for a box pair within that of a threshold.

Equal scores: `torch.sort` leaves their order unspecified; here they keep input order (stable sort):
within an image, the order of the detections given; across images, the order of the images.

Captions go to `meteor_fn` as given. DenseCap's references were lower-cased with punctuation deleted
(`preprocess.py` `words_preprocess`) and its captions drawn from that vocabulary; METEOR's `-norm`
lower-cases and tokenizes punctuation itself. The default `meteor_fn`, `toolkit_meteor`, runs the COCO
caption toolkit's METEOR 1.5 jar with the flags of `meteor_bridge.py`; it scores all pairs in one EVAL
line, and the jar scores each pair from its own statistics, so each score equals a one-pair exchange
(tests/test_densecap_metric.py checks this).

protocol="scenic": the official PixelLLM evaluator (`DensecapEval`), which differs in
  - the recall levels: k / 100 for k = 0..99 (a recall of exactly 1/2 reaches the level 0.5);
  - a detection that overlaps no box marks nothing used;
  - the IoU diagonal is not set to 1, so a zero-area ground-truth box joins no group and is dropped
    (not counted as a positive);
  and, not reproduced (VG references are never empty): with `ignore_empty_string`, a matched
  detection whose references include "" is scored as "EMPTY" against ["EMPTY"].
"""
from collections.abc import Callable, Iterable, Sequence
import dataclasses

import numpy as np

from pixelllm_jax.metrics.boxes import pairwise_iou

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
DETECTION_ONLY = -1.0  # the METEOR "threshold" of detmap: every score passes
MERGE_IOU = 0.7
PROTOCOLS = ("lua", "scenic")

# meteor_fn(candidates, references) -> one score per candidate, candidate i against references[i].
MeteorFn = Callable[[Sequence[str], Sequence[Sequence[str]]], Sequence[float]]


def _lua_recall_levels() -> np.ndarray:
  """The values Lua's `for t=0,1,0.01` visits: t advanced by repeated addition, while t <= 1."""
  levels, t = [], 0.0
  while t <= 1.0:
    levels.append(t)
    t += 0.01
  return np.array(levels)


RECALL_LEVELS = {"lua": _lua_recall_levels(), "scenic": np.arange(100) / 100.0}


@dataclasses.dataclass(frozen=True)
class ImageRegions:
  """One image's detections and its ground truth, boxes in one frame (module docstring).

  boxes: float[N, 4] xyxy; scores: float[N] (higher first); captions: N strings.
  gt_boxes: float[M, 4] xyxy; gt_captions: M strings.
  """
  boxes: np.ndarray
  scores: np.ndarray
  captions: Sequence[str]
  gt_boxes: np.ndarray
  gt_captions: Sequence[str]


def _check_protocol(protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol={protocol!r}: expected one of {PROTOCOLS}")


def _as_boxes(boxes, what: str) -> np.ndarray:
  boxes = np.asarray(boxes, np.float64)
  if boxes.size == 0:
    return boxes.reshape(0, 4)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"{what} must be float[n, 4] xyxy, got shape {boxes.shape}")
  if not np.isfinite(boxes).all():
    raise ValueError(f"{what} holds a non-finite coordinate")
  return boxes


def merge_gt_boxes(gt_boxes, gt_captions: Sequence[str], protocol: str = "lua"
                   ) -> tuple[np.ndarray, list[list[str]]]:
  """DenseCap's ground-truth merging at IoU >= 0.7 (docstring, step 1).

  float[M, 4], M captions -> (float64[K, 4] merged boxes, K lists of reference captions), K <= M.
  """
  _check_protocol(protocol)
  gt_boxes = _as_boxes(gt_boxes, "gt_boxes")
  if len(gt_captions) != len(gt_boxes):
    raise ValueError(f"{len(gt_boxes)} ground-truth boxes but {len(gt_captions)} captions")
  iou = pairwise_iou(gt_boxes, gt_boxes)
  if protocol == "lua":
    np.fill_diagonal(iou, 1.0)  # `iou_matrix` sets it, so even a zero-area box is its own group
  merged, references = [], []
  while iou.size:
    close = iou >= MERGE_IOU
    counts = close.sum(axis=0)
    top = int(np.argmax(counts))  # the first of the largest counts
    if counts[top] == 0:
      break
    group = np.flatnonzero(close[top])
    merged.append(gt_boxes[group].mean(axis=0))
    references.append([gt_captions[i] for i in group])
    iou[group, :] = 0.0
    iou[:, group] = 0.0
  return np.array(merged, np.float64).reshape(-1, 4), references


@dataclasses.dataclass(frozen=True)
class ImageMatches:
  """Detections of one image in score order, each with its best merged box.

  order: int[N], the detection indices by descending score (stable); iou: float64[N], IoU with the
  best merged box (0: overlaps none); box: int[N], that box's index (-1: none); ok: bool[N], the
  detection may count as a true positive (its box was unused and it overlaps it).
  """
  order: np.ndarray
  iou: np.ndarray
  box: np.ndarray
  ok: np.ndarray


def match_detections(boxes, scores, merged_boxes, protocol: str = "lua") -> ImageMatches:
  """DenseCap's greedy matching of one image's detections to its merged boxes (docstring, step 2)."""
  _check_protocol(protocol)
  boxes = _as_boxes(boxes, "boxes")
  merged_boxes = _as_boxes(merged_boxes, "merged_boxes")
  scores = np.asarray(scores, np.float64).reshape(-1)
  if len(scores) != len(boxes):
    raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
  if np.isnan(scores).any():
    raise ValueError("a detection score is NaN")
  order = np.argsort(-scores, kind="stable")
  ious = pairwise_iou(boxes[order], merged_boxes)  # [N, K]
  num = len(order)
  best_iou, best_box, ok = np.zeros(num), np.full(num, -1), np.zeros(num, bool)
  used = np.zeros(len(merged_boxes), bool)
  for d in range(num):
    if len(merged_boxes) and ious[d].max() > 0:
      best_box[d] = int(np.argmax(ious[d]))
      best_iou[d] = ious[d, best_box[d]]
      ok[d] = not used[best_box[d]]
      used[best_box[d]] = True
    elif len(merged_boxes) and protocol == "lua":
      used[-1] = True  # torch7 reads the match index -1 as the last box (docstring, step 2)
  return ImageMatches(order, best_iou, best_box, ok)


def average_precision(true_positive: np.ndarray, num_positives: int, recall_levels: np.ndarray
                      ) -> float:
  """DenseCap's max-interpolated AP (docstring, step 6).

  true_positive: bool[n], the detections of all images in descending score order.
  """
  true_positive = np.asarray(true_positive, bool)
  if true_positive.size == 0 or num_positives == 0:
    return 0.0  # Lua: no detection is an error (max of an empty tensor); no positives, recall NaN: 0
  tp = np.cumsum(true_positive, dtype=np.float64)
  fp = np.cumsum(~true_positive, dtype=np.float64)
  recall = tp / num_positives
  precision = tp / (tp + fp)
  # Recall never decreases, so "recall >= r" is a suffix: its best precision is a suffix maximum.
  best_after = np.maximum.accumulate(precision[::-1])[::-1]
  first = np.searchsorted(recall, recall_levels, side="left")
  total = 0.0
  for i in first:  # summed in level order, as the Lua loop
    total += float(best_after[i]) if i < len(recall) else 0.0
  return total / len(recall_levels)


def toolkit_meteor(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
  """METEOR 1.5 of each candidate against its own references, by the COCO caption toolkit's jar
  (`java_tools`; needs `java`). Line breaks become spaces: the jar reads one pair per line."""
  if not candidates:
    return []
  from pixelllm_jax.metrics import java_tools  # here: only this scorer needs Java
  one_line = str.maketrans({"\n": " ", "\r": " "})
  res = {i: [c.translate(one_line)] for i, c in enumerate(candidates)}
  gts = {i: [r.translate(one_line) for r in refs] for i, refs in enumerate(references)}
  return java_tools.meteor_score(gts, res)[1]


def ap_key(iou_threshold: float, meteor_threshold: float) -> str:
  """The result key of one AP, e.g. 'ap_iou0.5_meteor0.15' or (m = -1) 'det_ap_iou0.5'."""
  if meteor_threshold == DETECTION_ONLY:
    return f"det_ap_iou{iou_threshold:g}"
  return f"ap_iou{iou_threshold:g}_meteor{meteor_threshold:g}"


def densecap_map(images: Iterable[ImageRegions], meteor_fn: MeteorFn | None = None,
                 protocol: str = "lua") -> dict[str, float]:
  """Dense captioning mAP over a set of images (module docstring).

  -> {'map', 'detmap', ap_key(t, m) for every threshold pair, 'num_positives' (merged ground-truth
  boxes), 'num_detections'}. `meteor_fn` defaults to `toolkit_meteor`.
  """
  _check_protocol(protocol)
  meteor_fn = toolkit_meteor if meteor_fn is None else meteor_fn
  scores, ious, oks, candidates, references = [], [], [], [], []
  num_positives = 0
  for image in images:
    if len(image.captions) != len(image.boxes):
      raise ValueError(f"{len(image.boxes)} boxes but {len(image.captions)} captions")
    merged, merged_refs = merge_gt_boxes(image.gt_boxes, image.gt_captions, protocol)
    matches = match_detections(image.boxes, image.scores, merged, protocol)
    num_positives += len(merged)
    image_scores = np.asarray(image.scores, np.float64).reshape(-1)
    for d, index in enumerate(matches.order):
      scores.append(float(image_scores[index]))
      ious.append(matches.iou[d])
      oks.append(bool(matches.ok[d]))
      candidates.append(image.captions[index])
      references.append(merged_refs[matches.box[d]] if matches.box[d] >= 0 else [])
  ious, oks = np.array(ious, np.float64), np.array(oks, bool)

  meteor = np.zeros(len(scores))
  scored = np.flatnonzero(oks & (ious >= min(IOU_THRESHOLDS)))
  if len(scored):
    values = list(meteor_fn([candidates[i] for i in scored], [references[i] for i in scored]))
    if len(values) != len(scored):
      raise ValueError(f"meteor_fn returned {len(values)} scores for {len(scored)} captions")
    meteor[scored] = values

  rank = np.argsort(-np.array(scores, np.float64), kind="stable")
  levels = RECALL_LEVELS[protocol]
  results = {}
  for iou_threshold in IOU_THRESHOLDS:
    for meteor_threshold in (DETECTION_ONLY,) + METEOR_THRESHOLDS:
      positive = oks & (ious >= iou_threshold) & (meteor > meteor_threshold)
      results[ap_key(iou_threshold, meteor_threshold)] = average_precision(
          positive[rank], num_positives, levels)
  caption_aps = [results[ap_key(t, m)] for t in IOU_THRESHOLDS for m in METEOR_THRESHOLDS]
  detection_aps = [results[ap_key(t, DETECTION_ONLY)] for t in IOU_THRESHOLDS]
  return {"map": sum(caption_aps) / len(caption_aps),
          "detmap": sum(detection_aps) / len(detection_aps),
          **results, "num_positives": num_positives, "num_detections": len(scores)}
