"""The PNG of an answer: the user's image with each word written at its point.

The image is shown at a readable size (long side at least 512 px, by an integer factor,
and at most 1024 px), the request's prompt box or point in yellow, the answer's box in red,
its mask tinted red (densecap: its best regions' boxes in red), then each word at its point in its own colour
(`visualize.draw_words`). Coordinates are the answer's, in the image's pixels.
"""
import math

import numpy as np
from PIL import Image, ImageDraw

from pixelllm_jax import visualize
from pixelllm_jax.infer.inferencer import Answer

PROMPT_COLOUR = (255, 215, 0)
MIN_LONG_SIDE, MAX_LONG_SIDE = 512, 1024
MAX_REGIONS = 10  # densecap: the best-scored regions drawn (the JSON has them all)


def display_scale(width: int, height: int) -> float:
  """The factor from image pixels to PNG pixels (module docstring)."""
  long_side = max(width, height)
  if long_side < MIN_LONG_SIDE:
    return float(math.ceil(MIN_LONG_SIDE / long_side))
  return min(1.0, MAX_LONG_SIDE / long_side)


def render(answer: Answer) -> np.ndarray:
  """uint8[h, w, 3]: the answer drawn on its image (module docstring)."""
  height, width = answer.image.shape[:2]
  scale = display_scale(width, height)
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  shown = np.asarray(Image.fromarray(answer.image).resize(size, Image.Resampling.BICUBIC),
                     np.float32)
  if answer.mask is not None:
    mask = np.asarray(Image.fromarray(answer.mask.astype(np.uint8) * 255).resize(
        size, Image.Resampling.NEAREST)) > 127
    shown[mask] = 0.5 * shown[mask] + 0.5 * np.asarray(visualize.PRED_COLOUR, np.float32)
  canvas = Image.fromarray(shown.astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  prompt = answer.json["prompt"]
  if "box" in prompt:
    draw.rectangle([v * scale for v in prompt["box"]], outline=PROMPT_COLOUR, width=2)
  if "point" in prompt:
    x, y = (v * scale for v in prompt["point"])
    draw.line((x - 6, y, x + 6, y), fill=PROMPT_COLOUR, width=2)
    draw.line((x, y - 6, x, y + 6), fill=PROMPT_COLOUR, width=2)
  for region in answer.json.get("regions", [])[:MAX_REGIONS]:  # densecap
    draw.rectangle([v * scale for v in region["box"]], outline=visualize.PRED_COLOUR, width=2)
  image = np.asarray(canvas)
  normalize = np.array([width, height, width, height], np.float64)
  if "box" in answer.json:
    image = visualize.draw_boxes(image, np.asarray(answer.json["box"]) / normalize, None,
                                 answer.json.get("prompt", {}).get("expression", ""), scale=1)
  words = answer.json["words"]
  if words:
    points = np.array([w["point"] for w in words], np.float64) / normalize[:2]
    image = visualize.draw_words(image, [w["text"] for w in words], points, scale=1)
  return image
