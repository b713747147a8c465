"""Box geometry for the metrics: IoU, clipping, coordinate conversion.

Conventions (pixelllm_jax/batch.py): boxes are xyxy, points are xy, and model coordinates are
normalized to [0, 1] of the unpadded image. Everything here is numpy and runs on the host after
the model; the same functions work on normalized or pixel coordinates as long as both arguments use
the same frame (IoU is invariant to scaling both axes, so normalized IoU equals pixel IoU).

A degenerate box (x1 <= x0 or y1 <= y0) has zero area. IoU is 0 where the union is 0, so two
degenerate boxes never count as a match.
"""
import numpy as np


def box_area(boxes: np.ndarray) -> np.ndarray:
  """float[..., 4] xyxy -> float[...]; inverted boxes have area 0."""
  boxes = np.asarray(boxes, np.float64)
  width = np.clip(boxes[..., 2] - boxes[..., 0], 0.0, None)
  height = np.clip(boxes[..., 3] - boxes[..., 1], 0.0, None)
  return width * height


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of broadcast-compatible xyxy boxes float[..., 4]."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  top_left = np.maximum(a[..., :2], b[..., :2])
  bottom_right = np.minimum(a[..., 2:], b[..., 2:])
  wh = np.clip(bottom_right - top_left, 0.0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a) + box_area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def pairwise_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
  """All-pairs IoU: float[N, 4], float[M, 4] -> float64[N, M]."""
  return _iou(np.asarray(boxes_a)[:, None, :], np.asarray(boxes_b)[None, :, :])


def paired_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
  """Element-wise IoU of matching rows: float[..., 4], float[..., 4] -> float64[...]."""
  return _iou(boxes_a, boxes_b)


def clip_to_image(coords: np.ndarray, width: float = 1.0, height: float = 1.0) -> np.ndarray:
  """Clips xy / xyxy coordinates float[..., 2k] into [0, width] x [0, height] (default normalized).

  The official evaluators clip predicted boxes to the image before scoring; a head may predict
  corners slightly outside [0, 1].
  """
  coords = np.asarray(coords, np.float64)
  return np.clip(coords, 0.0, _xy_scale(coords.shape[-1], width, height))


def _xy_scale(last_dim: int, width: float, height: float) -> np.ndarray:
  if last_dim % 2:
    raise ValueError(f"last dim must hold xy pairs, got {last_dim}")
  return np.tile(np.array([width, height], np.float64), last_dim // 2)


def to_pixels(coords: np.ndarray, width: float, height: float) -> np.ndarray:
  """Normalized xy / xyxy coordinates float[..., 2k] -> pixels of a width x height image."""
  coords = np.asarray(coords, np.float64)
  return coords * _xy_scale(coords.shape[-1], width, height)


def to_normalized(coords: np.ndarray, width: float, height: float) -> np.ndarray:
  """Pixel xy / xyxy coordinates float[..., 2k] -> normalized to [0, 1] of the image."""
  coords = np.asarray(coords, np.float64)
  return coords / _xy_scale(coords.shape[-1], width, height)
