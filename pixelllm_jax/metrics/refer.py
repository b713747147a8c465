"""Referring localization and segmentation metrics (docs/DESIGN.md, "Metrics").

- Box precision P@0.5 follows the official RefCOCO evaluator: an expression is a hit when its one
  predicted box has IoU **strictly greater** than the threshold with its one ground-truth box, so an
  IoU of exactly 0.5 is a miss. Precision is the fraction of hits over all expressions.
- Segmentation reports both official aggregates: cIoU (cumulative IoU, sum of intersections over sum
  of unions across all expressions, so large objects weigh more) and mean IoU (the mean of
  per-expression IoUs, "gIoU" in the official code), plus the fraction of masks with IoU > 0.5.

Per-expression IoU is 0 where the union is empty (both masks empty, or both boxes degenerate).
"""
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from pixelllm_jax.metrics import boxes as boxes_lib


class BoxScores(NamedTuple):
  precision: float  # fraction of expressions with IoU > threshold
  mean_iou: float   # mean per-expression box IoU
  count: int        # number of expressions scored


class MaskScores(NamedTuple):
  ciou: float       # sum of intersections / sum of unions
  mean_iou: float   # mean per-expression mask IoU
  precision: float  # fraction of expressions with mask IoU > threshold
  count: int


def refer_precision(pred_boxes: np.ndarray, gt_boxes: np.ndarray,
                    threshold: float = 0.5) -> BoxScores:
  """P@threshold and mean IoU of one predicted box per expression.

  As the official evaluator, clip predictions to the image first (`boxes.clip_to_image`); this
  function scores the boxes it is given.

  Args:
    pred_boxes: float[N, 4] xyxy, one per expression (normalized or pixels, same as gt_boxes).
    gt_boxes: float[N, 4] xyxy, the referred object's box.
    threshold: a hit needs IoU > threshold (strict).
  """
  pred_boxes = np.asarray(pred_boxes).reshape(-1, 4)
  gt_boxes = np.asarray(gt_boxes).reshape(-1, 4)
  if pred_boxes.shape != gt_boxes.shape:
    raise ValueError(f"{pred_boxes.shape=} != {gt_boxes.shape=}")
  if not len(pred_boxes):
    raise ValueError("no expressions to score")
  ious = boxes_lib.paired_iou(pred_boxes, gt_boxes)
  return BoxScores(precision=float(np.mean(ious > threshold)), mean_iou=float(np.mean(ious)),
                   count=len(ious))


def mask_intersection_union(pred_mask: np.ndarray, gt_mask: np.ndarray) -> tuple[int, int]:
  """Pixel counts (|P & G|, |P | G|) of two boolean masks bool[H, W] of the same size."""
  pred_mask = np.asarray(pred_mask, bool)
  gt_mask = np.asarray(gt_mask, bool)
  if pred_mask.shape != gt_mask.shape:
    raise ValueError(f"{pred_mask.shape=} != {gt_mask.shape=}")
  return int(np.sum(pred_mask & gt_mask)), int(np.sum(pred_mask | gt_mask))


def segmentation_scores(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray],
                        threshold: float = 0.5) -> MaskScores:
  """cIoU, mean IoU and precision over expressions.

  Args:
    pred_masks: one bool[H_i, W_i] per expression, at the original image size (sizes may differ
      between expressions, hence a sequence rather than one array).
    gt_masks: the matching ground-truth masks, same sizes.
    threshold: precision counts IoU > threshold (strict, as for boxes).
  """
  if len(pred_masks) != len(gt_masks):
    raise ValueError(f"{len(pred_masks)} predicted masks for {len(gt_masks)} ground-truth masks")
  if not len(pred_masks):
    raise ValueError("no expressions to score")
  counts = [mask_intersection_union(p, g) for p, g in zip(pred_masks, gt_masks)]
  return scores_from_counts([i for i, _ in counts], [u for _, u in counts], threshold)


def scores_from_counts(intersections: Sequence[int], unions: Sequence[int],
                       threshold: float = 0.5) -> MaskScores:
  """`segmentation_scores` from each expression's pixel counts (|P & G|, |P | G|)."""
  inter = np.asarray(intersections, np.float64).reshape(-1)
  union = np.asarray(unions, np.float64).reshape(-1)
  if inter.shape != union.shape:
    raise ValueError(f"{inter.shape=} != {union.shape=}")
  if not len(union):
    raise ValueError("no expressions to score")
  ious = np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)
  total_union = union.sum()
  ciou = inter.sum() / total_union if total_union > 0 else 0.0
  return MaskScores(ciou=float(ciou), mean_iou=float(ious.mean()),
                    precision=float(np.mean(ious > threshold)), count=len(ious))
