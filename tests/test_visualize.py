"""visualize.py: output sizes, drawing lands where the coordinates say, PNGs reopen."""
import numpy as np
from PIL import Image
import pytest

from pixelllm_jax import visualize


def _grey(height=16, width=24):
  return np.full((height, width, 3), 128, np.uint8)


def test_draw_words_size_and_marks_at_points():
  image = _grey()
  out = visualize.draw_words(image, ["cat", "mat"], np.array([[0.25, 0.5], [1.0, 0.0]]), scale=4)
  assert out.shape == (64, 96, 3) and out.dtype == np.uint8
  # The first word's ring (radius 4, colour PALETTE[0]) is centred on pixel (0.25 * 95, 0.5 * 63).
  cx, cy = round(0.25 * 95), round(0.5 * 63)
  patch = out[cy - 5:cy + 6, cx - 5:cx + 6].reshape(-1, 3)
  assert np.any(np.all(patch == visualize.PALETTE[0], axis=-1))
  # The canvas away from the words keeps the (upscaled) input colour.
  assert np.all(out[60:, :20] == 128)
  # The input is not modified.
  assert np.all(image == 128)


def test_draw_words_skips_non_finite_and_checks_lengths():
  blank = visualize.draw_words(_grey(), ["x"], np.array([[np.nan, 0.5]]), scale=2)
  assert blank.shape == (32, 48, 3) and np.all(blank == 128)
  with pytest.raises(ValueError):
    visualize.draw_words(_grey(), ["a", "b"], np.zeros((1, 2)))
  with pytest.raises(ValueError):
    visualize.draw_words(np.zeros((4, 4, 3), np.float32), [], np.zeros((0, 2)))


def test_draw_boxes_colours_and_size():
  out = visualize.draw_boxes(_grey(32, 32), pred_box=[0.5, 0.5, 1.0, 1.0],
                             gt_box=[0.0, 0.0, 0.25, 1.0], label="IoU 0.00", scale=4)
  assert out.shape == (128, 128, 3)
  # Left edges: the true box at x = 0 (green), the prediction at x = 0.5 * 127 ~ 64 (red),
  # each sampled mid-height where no legend or label text reaches.
  assert tuple(out[60, 0]) == visualize.TRUE_COLOUR
  assert tuple(out[100, 64]) == visualize.PRED_COLOUR
  only_pred = visualize.draw_boxes(_grey(32, 32), [0.5, 0.5, 1.0, 1.0], None, scale=1)
  assert only_pred.shape == (32, 32, 3)
  assert not np.any(np.all(only_pred == visualize.TRUE_COLOUR, axis=-1))


def test_save_png_round_trip(tmp_path):
  out = visualize.draw_words(_grey(), ["a"], np.array([[0.5, 0.5]]))
  path = tmp_path / "sub" / "words.png"
  visualize.save_png(path, out)
  with Image.open(path) as reopened:
    assert reopened.format == "PNG"
    np.testing.assert_array_equal(np.asarray(reopened.convert("RGB")), out)
