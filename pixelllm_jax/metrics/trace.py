"""Trace metrics: per-token point L1 and pointing accuracy (docs/DESIGN.md, "Metrics").

Point L1, as the official `PointEvaluator`, all in coordinates normalized to [0, 1] of the image:
  1. distance between a predicted point p and a ground-truth point g is the mean of |dx| and |dy|,
     i.e. (|p_x - g_x| + |p_y - g_y|) / 2;
  2. a token's distance: each of its P predicted points takes the min over the token's Q
     ground-truth points, then these P minima are averaged;
  3. tokens are scored only where the ground truth is present: a token whose Q ground-truth points
     are all exactly zero (padding, truncation, no trace) is excluded, as is any token outside the
     optional `token_mask` (e.g. EOS / pad positions);
  4. per image: the mean over its scored tokens (all caption slots of the image pooled);
  5. dataset: the mean over images that have at least one scored token (images, not tokens, weigh
     equally). With nothing scored the result is NaN. (The official evaluator divides by the token
     count + 1e-8, so an image without a scored token enters its mean as 0; leaving it out is the
     one difference, and none where every image has a traced token, as in Localized Narratives.)

With the default 2-point head and box targets (Q = 2 corners), step 2 matches each predicted corner
to the nearer ground-truth corner.

Pointing accuracy: over tokens that name an object, the fraction whose predicted location lies
inside that object's box, borders included. The predicted location is the mean of the token's P
points (the box centre for P = 2, the point itself for P = 1). The fraction is over tokens pooled
across the whole set (not per image); NaN when no token names an object.
"""
from collections.abc import Sequence

import numpy as np


def token_point_l1(pred_points: np.ndarray, gt_points: np.ndarray) -> np.ndarray:
  """Per-token distance (steps 1-2 above): float[..., P, 2], float[..., Q, 2] -> float64[...]."""
  pred = np.asarray(pred_points, np.float64)[..., :, None, :]  # [..., P, 1, 2]
  gt = np.asarray(gt_points, np.float64)[..., None, :, :]      # [..., 1, Q, 2]
  dist_PxQ = np.abs(pred - gt).mean(axis=-1)
  return dist_PxQ.min(axis=-1).mean(axis=-1)


def gt_present(gt_points: np.ndarray) -> np.ndarray:
  """bool[...]: the token has a ground truth (not all of its Q points are exactly zero)."""
  return np.any(np.asarray(gt_points) != 0, axis=(-2, -1))


def image_point_l1(pred_points: np.ndarray, gt_points: np.ndarray,
                   token_mask: np.ndarray | None = None) -> float:
  """Mean token distance of one image (steps 1-4); NaN if no token is scored.

  Args:
    pred_points: float[..., P, 2] normalized, e.g. [N, L, P, 2] for N caption slots of L tokens.
    gt_points: float[..., Q, 2] normalized, same leading shape.
    token_mask: optional bool[...] of tokens eligible for scoring.
  """
  scored = gt_present(gt_points)
  if token_mask is not None:
    scored &= np.asarray(token_mask, bool)
  if not scored.any():
    return float("nan")
  return float(token_point_l1(pred_points, gt_points)[scored].mean())


def point_l1(pred_points: Sequence[np.ndarray], gt_points: Sequence[np.ndarray],
             token_masks: Sequence[np.ndarray] | None = None) -> float:
  """Dataset point L1 (step 5): the mean over images of `image_point_l1`.

  Each argument holds one entry per image (leading shapes may differ between images).
  """
  if len(pred_points) != len(gt_points):
    raise ValueError(f"{len(pred_points)} predictions for {len(gt_points)} ground truths")
  masks = token_masks if token_masks is not None else [None] * len(pred_points)
  per_image = np.array([image_point_l1(p, g, m) for p, g, m in zip(pred_points, gt_points, masks)])
  per_image = per_image[~np.isnan(per_image)]
  return float(per_image.mean()) if per_image.size else float("nan")


def pointing_accuracy(pred_points: np.ndarray, object_boxes: np.ndarray,
                      object_mask: np.ndarray | None = None) -> float:
  """Fraction of object-naming tokens whose predicted location lies inside the object's box.

  Args:
    pred_points: float[..., P, 2] normalized predictions per token.
    object_boxes: float[..., 4] xyxy normalized box of the object each token names.
    object_mask: bool[...] tokens that name an object; None means every token does.
  """
  location = np.asarray(pred_points, np.float64).mean(axis=-2)  # [..., 2]
  boxes = np.asarray(object_boxes, np.float64)
  inside = np.all((location >= boxes[..., :2]) & (location <= boxes[..., 2:]), axis=-1)
  if object_mask is not None:
    inside = inside[np.asarray(object_mask, bool)]
  return float(inside.mean()) if inside.size else float("nan")
