"""COCO segmentations -> uint8[H, W] 0/1 masks: polygons and RLE (both forms).

- Polygons ([[x0, y0, x1, y1, ...], ...], pixels) are rasterized by sampling
  pixel centers (even-odd rule within a polygon, union across polygons), as
  pycocotools does; PIL's `ImageDraw.polygon` fills a closed outline and grows
  every mask by about a pixel, so it is not used.
- RLE ({"size": [H, W], "counts": ...}, column-major runs starting with zeros)
  is decoded with `pycocotools.mask`, in both forms COCO uses: compressed
  (`counts` a string, as in crowd annotations and MDETR's masks) and
  uncompressed (`counts` a list of ints). Both are validated here first (size
  equals the image's, every run non-negative, runs sum to H * W, a well-formed
  compressed string): pycocotools decodes a garbled string without complaint.

A malformed segmentation raises `common.BadRecord`.
"""
import warnings
from typing import Any

import numpy as np
from pycocotools import mask as mask_api

from pixelllm_jax.data.builders import common


def segmentation_to_mask(segmentation: Any, width: int, height: int) -> np.ndarray:
  """uint8[H, W] 0/1 mask of a COCO `segmentation` (polygons or RLE)."""
  if isinstance(segmentation, dict):
    return rle_to_mask(segmentation, width, height)
  return polygons_to_mask(segmentation, width, height)


def rle_to_mask(rle: dict[str, Any], width: int, height: int) -> np.ndarray:
  """uint8[H, W] 0/1 mask of a compressed or uncompressed COCO RLE."""
  size, counts = rle.get("size"), rle.get("counts")
  if not (isinstance(size, (list, tuple)) and len(size) == 2
          and all(isinstance(v, int) for v in size)):
    raise common.BadRecord("malformed segmentation", f"RLE size {size!r}")
  if list(size) != [height, width]:
    raise common.BadRecord("RLE size differs from the image", f"{list(size)} vs [{height}, {width}]")
  if isinstance(counts, list):
    if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
      raise common.BadRecord("malformed segmentation", "RLE counts are not runs covering the image")
    encoded = mask_api.frPyObjects({"size": [height, width], "counts": counts}, height, width)
  elif isinstance(counts, (str, bytes)):
    data = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
    runs = _runs_of_compressed(data)
    if any(c < 0 for c in runs) or sum(runs) != height * width:
      raise common.BadRecord("malformed segmentation", "RLE counts are not runs covering the image")
    encoded = {"size": [height, width], "counts": data}
  else:
    raise common.BadRecord("malformed segmentation", f"RLE counts of type {type(counts).__name__}")
  with warnings.catch_warnings():  # pycocotools' numpy-2 copy=False notice
    warnings.simplefilter("ignore", DeprecationWarning)
    mask_HxW = mask_api.decode(encoded)
  return np.ascontiguousarray(mask_HxW.reshape(height, width)).astype(np.uint8)


def _runs_of_compressed(data: bytes) -> list[int]:
  """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString)."""
  runs: list[int] = []
  p = 0
  while p < len(data):
    x, k, more = 0, 0, True
    while more:
      if p >= len(data):
        raise common.BadRecord("malformed segmentation", "RLE string ends inside a run")
      c = data[p] - 48
      if not 0 <= c < 64:
        raise common.BadRecord("malformed segmentation", f"RLE string has byte {data[p]!r}")
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and c & 0x10:
        x |= -1 << (5 * k)
    if len(runs) > 2:
      x += runs[-2]
    runs.append(x)
  return runs


def polygons_to_mask(polygons: Any, width: int, height: int) -> np.ndarray:
  """uint8[H, W] 0/1 mask of COCO polygons ([[x0, y0, x1, y1, ...], ...], pixels).

  A pixel is inside when its center is (even-odd rule per polygon, union over
  polygons); edges are half-open (left/top in, right/bottom out), so polygons
  that tile a region cover each pixel once. Raises BadRecord on a malformed or empty segmentation.
  """
  if not isinstance(polygons, list) or not polygons:
    raise common.BadRecord("malformed segmentation", repr(polygons)[:80])
  mask_HxW = np.zeros((height, width), bool)
  centers_y = np.arange(height) + 0.5
  centers_x = np.arange(width) + 0.5
  for polygon in polygons:
    try:
      xy_Px2 = np.asarray(polygon, np.float64).reshape(-1, 2)
    except (TypeError, ValueError) as e:
      raise common.BadRecord("malformed segmentation", repr(polygon)[:80]) from e
    if len(xy_Px2) < 3 or len(polygon) % 2 or not np.all(np.isfinite(xy_Px2)):
      raise common.BadRecord("malformed segmentation", repr(polygon)[:80])
    x0, y0 = xy_Px2[:, 0], xy_Px2[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    # Edge e crosses the row through y when y lies in [min(y0, y1), max(y0, y1)).
    crosses_HxE = (y0 <= centers_y[:, None]) != (y1 <= centers_y[:, None])
    slope_E = np.divide(x1 - x0, y1 - y0, out=np.zeros_like(x0), where=y1 != y0)
    cross_x_HxE = x0 + (centers_y[:, None] - y0) * slope_E
    for row in np.flatnonzero(crosses_HxE.any(axis=1)):
      xs = np.sort(cross_x_HxE[row, crosses_HxE[row]])
      # Half-open like the rows: a center on a left edge is in, on a right edge out.
      inside_W = np.searchsorted(xs, centers_x, side="right") % 2 == 1
      mask_HxW[row] |= inside_W
  return mask_HxW.astype(np.uint8)
