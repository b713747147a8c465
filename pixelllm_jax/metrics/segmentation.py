"""Referring segmentation: masks at the original image size, streaming cIoU / mIoU, COCO RLE.

- `logits_to_mask` follows the official evaluator: the mask head's low-res
  logits (covering the padded canvas) are bilinearly upsampled to the canvas,
  cropped to the part that holds the image, resized to the original image and
  thresholded at 0 (logit > 0, i.e. probability > 0.5).
- Bilinear resizing is the usual half-pixel one without antialiasing (cv2
  `INTER_LINEAR`, torch `align_corners=False`, which the official code's cv2
  resize computes; for upsampling it equals `jax.image.resize(..., 'bilinear')`,
  which the training loss uses).
- `MaskCounts` accumulates each expression's intersection and union, so a
  split's full-resolution masks need not be held at once; its scores are
  `metrics.refer.segmentation_scores` (cIoU = sum of intersections / sum of
  unions; mean IoU; fraction with IoU > 0.5).
- Predictions are saved as COCO RLE (`pycocotools.mask.encode`, counts as a
  string so they go into JSON).
"""
import warnings

import numpy as np
from pycocotools import mask as mask_api

from pixelllm_jax.metrics import refer


def resize_bilinear(x_HxW: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """float[H, W] -> float32[h, w]: half-pixel-centre bilinear, edges clamped, no antialiasing."""
  x = np.asarray(x_HxW, np.float32)

  def taps(n_in: int, n_out: int):
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)

  (h_lo, h_hi, fh), (w_lo, w_hi, fw) = taps(x.shape[0], out_hw[0]), taps(x.shape[1], out_hw[1])
  rows = x[h_lo] * (1 - fh)[:, None] + x[h_hi] * fh[:, None]
  return rows[:, w_lo] * (1 - fw)[None] + rows[:, w_hi] * fw[None]


def valid_extent(valid_hw: np.ndarray, canvas_hw: tuple[int, int]) -> tuple[int, int]:
  """(rows, cols) of the canvas that hold the image (`Batch.image_valid_hw`), at least 1 each."""
  return (max(1, int(round(float(valid_hw[0]) * canvas_hw[0]))),
          max(1, int(round(float(valid_hw[1]) * canvas_hw[1]))))


def logits_to_mask(logits_hxw: np.ndarray, canvas_hw: tuple[int, int], valid_hw: np.ndarray,
                   original_hw: tuple[int, int]) -> np.ndarray:
  """bool[H0, W0]: one slot's predicted mask on its original image.

  Args:
    logits_hxw: the mask head's low-res logits over the padded canvas.
    canvas_hw: the canvas size in pixels (the batch's image size).
    valid_hw: float[2], the fraction of the canvas holding the image (`Batch.image_valid_hw`).
    original_hw: the image's size before it was put on the canvas.
  """
  canvas = resize_bilinear(logits_hxw, canvas_hw)
  vh, vw = valid_extent(valid_hw, canvas_hw)
  return resize_bilinear(canvas[:vh, :vw], original_hw) > 0


class MaskCounts:
  """Per-expression intersections and unions, added one expression at a time."""

  def __init__(self):
    self.intersections: list[int] = []
    self.unions: list[int] = []

  def add(self, pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Adds one expression's masks (bool[H, W], same size); returns its IoU (0 for an
    empty union, as `metrics.refer`)."""
    inter, union = refer.mask_intersection_union(pred_mask, gt_mask)
    self.intersections.append(inter)
    self.unions.append(union)
    return inter / union if union else 0.0

  def __len__(self) -> int:
    return len(self.unions)

  def scores(self, threshold: float = 0.5) -> refer.MaskScores:
    """cIoU, mean IoU, precision (IoU > threshold) and count: `refer.segmentation_scores`."""
    return refer.scores_from_counts(self.intersections, self.unions, threshold)


def encode_rle(mask_HxW: np.ndarray) -> dict:
  """COCO RLE {'size': [H, W], 'counts': str} of a bool[H, W] mask."""
  mask = np.asfortranarray(np.asarray(mask_HxW, np.uint8))
  if mask.ndim != 2:
    raise ValueError(f"expected a mask [H, W], got shape {mask.shape}")
  rle = mask_api.encode(mask)
  return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
  """bool[H, W] of a COCO RLE from `encode_rle` (or pycocotools)."""
  counts = rle["counts"]
  coded = {"size": list(rle["size"]),
           "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
  with warnings.catch_warnings():  # pycocotools' numpy-2 copy=False notice
    warnings.simplefilter("ignore", DeprecationWarning)
    return mask_api.decode(coded).astype(bool)
