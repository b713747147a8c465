"""PNG visualizations of grounded captions and referring boxes (PIL only, no font files).

- `draw_words`: the image upscaled, each word written at its predicted point with a small ring
  marker, one colour per word (cycled from a 10-colour palette) and a dark outline around the text
  so it stays readable on any background.
- `draw_boxes`: a predicted box (red) against the true box (green), a legend and a label.
- `save_png`: writes a uint8 image.

Inputs follow pixelllm_jax/batch.py: images uint8[H, W, 3], coordinates normalized to [0, 1] of the
image, xy order, boxes xyxy. Points outside the image are clipped onto its border so every word
shows; non-finite points are skipped. Text uses PIL's built-in default font.
"""
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Tableau 10: distinct hues, readable on photos.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
PRED_COLOUR = (230, 30, 30)
TRUE_COLOUR = (30, 200, 60)
_OUTLINE = (0, 0, 0)
_FONT_SIZE = 11


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  try:
    return ImageFont.load_default(size=_FONT_SIZE)
  except (TypeError, ImportError):  # PIL without FreeType: fixed-size bitmap font
    return ImageFont.load_default()


def _upscaled(image: np.ndarray, scale: int) -> Image.Image:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
  if scale < 1:
    raise ValueError(f"scale must be >= 1, got {scale}")
  height, width = image.shape[:2]
  return Image.fromarray(image).resize((width * scale, height * scale), Image.Resampling.BICUBIC)


def _to_canvas(xy: np.ndarray, size: tuple[int, int]) -> tuple[float, float]:
  """Normalized xy -> pixel xy on a canvas of PIL size (width, height), clipped inside it."""
  width, height = size
  return (float(np.clip(xy[0], 0.0, 1.0)) * (width - 1),
          float(np.clip(xy[1], 0.0, 1.0)) * (height - 1))


def _text(canvas: Image.Image, draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
          colour: tuple[int, int, int], font) -> None:
  """Text with a 1-px dark outline, shifted to stay inside the canvas."""
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=1)
  width, height = canvas.size
  x = min(max(xy[0], 0), max(width - (right - left), 0))
  y = min(max(xy[1], 0), max(height - (bottom - top), 0))
  draw.text((x - left, y - top), text, fill=colour, font=font, stroke_width=1, stroke_fill=_OUTLINE)


def draw_words(image: np.ndarray, words: list[str], points: np.ndarray,
               scale: int = 4) -> np.ndarray:
  """Each word written at its predicted point on the upscaled image.

  Args:
    image: uint8[H, W, 3].
    words: n words (or sub-word pieces) in caption order.
    points: float[n, 2] normalized xy, one location per word (for a 2-point head pass the
      midpoint of the two points).
    scale: integer upscaling factor, so text fits on small images.

  Returns:
    uint8[H * scale, W * scale, 3].
  """
  points = np.asarray(points, np.float64).reshape(-1, 2)
  if len(words) != len(points):
    raise ValueError(f"{len(words)} words but {len(points)} points")
  canvas = _upscaled(image, scale)
  draw = ImageDraw.Draw(canvas)
  font = _font()
  radius = max(2, scale)
  for i, (word, point) in enumerate(zip(words, points)):
    if not np.all(np.isfinite(point)):
      continue
    colour = PALETTE[i % len(PALETTE)]
    x, y = _to_canvas(point, canvas.size)
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=2)
    _text(canvas, draw, (x + radius + 1, y - radius), word, colour, font)
  return np.asarray(canvas)


def draw_boxes(image: np.ndarray, pred_box: np.ndarray | None, gt_box: np.ndarray | None,
               label: str = "", scale: int = 4) -> np.ndarray:
  """Predicted (red) and true (green) xyxy normalized boxes with a legend and a label.

  Args:
    image: uint8[H, W, 3].
    pred_box: float[4] normalized xyxy, or None to draw only the true box.
    gt_box: float[4] normalized xyxy, or None to draw only the prediction.
    label: text written at the bottom (e.g. the referring expression and its IoU).
    scale: integer upscaling factor.

  Returns:
    uint8[H * scale, W * scale, 3].
  """
  canvas = _upscaled(image, scale)
  draw = ImageDraw.Draw(canvas)
  font = _font()
  legend = []
  for name, box, colour in (("true", gt_box, TRUE_COLOUR), ("pred", pred_box, PRED_COLOUR)):
    if box is None:
      continue
    box = np.asarray(box, np.float64).reshape(4)
    x0, y0 = _to_canvas(box[:2], canvas.size)
    x1, y1 = _to_canvas(box[2:], canvas.size)
    draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), outline=colour, width=2)
    legend.append((name, colour))
  line_height = draw.textbbox((0, 0), "Ag", font=font, stroke_width=1)[3] + 2
  for row, (name, colour) in enumerate(legend):
    _text(canvas, draw, (2, 2 + row * line_height), name, colour, font)
  if label:
    _text(canvas, draw, (2, canvas.size[1] - line_height), label, (255, 255, 255), font)
  return np.asarray(canvas)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes uint8[H, W, 3] (or [H, W]) as PNG, creating parent folders."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8, got {image.dtype}")
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(image).save(path, format="PNG")
