"""Tests for models/prompt_encoder.py: SAM's box / point / dense encodings."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax.models.prompt_encoder import PromptEncoder, PromptEncoderConfig
from axis_names import assert_known_axis_names

D = 16
CANVAS_HW = (32, 48)
CONFIG = PromptEncoderConfig(embed_dim=D, input_image_size=CANVAS_HW)
MODEL = PromptEncoder(CONFIG)


@pytest.fixture(scope="module")
def variables():
  return MODEL.init(
      jax.random.key(0), jnp.zeros((1, 1, 4)), jnp.ones((1, 2)), method=PromptEncoder.embed_boxes)


def _params(variables):
  return nn.unbox(variables)["params"]


def _np_pe(xy, gaussian):
  """SAM's PE of normalized coordinates, written out in float64."""
  proj = 2 * np.pi * ((2 * np.asarray(xy, np.float64) - 1) @ np.asarray(gaussian, np.float64))
  return np.concatenate([np.sin(proj), np.cos(proj)], -1)


def _boxes(variables, boxes, valid_hw):
  return MODEL.apply(variables, jnp.asarray(boxes, jnp.float32), jnp.asarray(valid_hw, jnp.float32),
                     method=PromptEncoder.embed_boxes)


def _points(variables, points, labels, valid_hw):
  return MODEL.apply(variables, jnp.asarray(points, jnp.float32), jnp.asarray(labels, jnp.int32),
                     jnp.asarray(valid_hw, jnp.float32), method=PromptEncoder.embed_points)


def test_shapes(variables):
  assert _boxes(variables, np.zeros((2, 3, 4)), np.ones((2, 2))).shape == (2, 3, 2, D)
  assert _points(variables, np.zeros((2, 3, 5, 2)), np.ones((2, 3, 5)),
                 np.ones((2, 2))).shape == (2, 3, 5, D)
  assert MODEL.apply(variables, (3, 5), method=PromptEncoder.dense_pe).shape == (3, 5, D)
  assert MODEL.apply(variables, method=PromptEncoder.no_mask_embed).shape == (D,)


def test_box_is_fourier_pe_of_pixel_centres_plus_corner_embeddings(variables):
  p = _params(variables)
  h, w = CANVAS_HW
  box = np.array([0.25, 0.5, 0.75, 1.0])
  out = np.asarray(_boxes(variables, box[None, None], [[1.0, 1.0]]))[0, 0]
  # SAM: absolute pixels + 0.5, divided by the canvas size (x by W, y by H).
  tl = [(0.25 * w + 0.5) / w, (0.5 * h + 0.5) / h]
  br = [(0.75 * w + 0.5) / w, (1.0 * h + 0.5) / h]
  expected = _np_pe([tl, br], p["positional_encoding_gaussian_matrix"])
  expected += np.asarray(p["point_embeddings"])[2:4]
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_swapping_corner_embeddings(variables):
  p = _params(variables)
  table = np.asarray(p["point_embeddings"])
  swapped = jax.tree_util.tree_map(lambda x: x, p)
  swapped["point_embeddings"] = jnp.asarray(table[[0, 1, 3, 2]])
  boxes = np.array([[[0.1, 0.2, 0.6, 0.9]]])
  out = _boxes(variables, boxes, [[1.0, 1.0]])
  out_swapped = _boxes({"params": swapped}, boxes, [[1.0, 1.0]])
  delta = table[3] - table[2]
  np.testing.assert_allclose(out_swapped[0, 0, 0] - out[0, 0, 0], delta, atol=1e-5, rtol=0)
  np.testing.assert_allclose(out_swapped[0, 0, 1] - out[0, 0, 1], -delta, atol=1e-5, rtol=0)


def test_valid_hw_maps_image_coordinates_onto_the_canvas(variables):
  # Image 0 fills the left half of the canvas, image 1 the top 3/4; a box over
  # the whole image equals the corresponding canvas-fraction box on a full image.
  full_image = np.array([[[0.0, 0.0, 1.0, 1.0]], [[0.0, 0.0, 1.0, 1.0]]])
  padded = _boxes(variables, full_image, [[1.0, 0.5], [0.75, 1.0]])
  canvas = _boxes(variables, np.array([[[0.0, 0.0, 0.5, 1.0]], [[0.0, 0.0, 1.0, 0.75]]]),
                  [[1.0, 1.0], [1.0, 1.0]])
  np.testing.assert_allclose(padded, canvas, atol=1e-6, rtol=0)
  # And the two images' embeddings of the same normalized box differ.
  assert float(jnp.max(jnp.abs(padded[0] - padded[1]))) > 1e-2


def test_padding_points_ignore_coordinates(variables):
  p = _params(variables)
  points = np.array([[[[0.1, 0.2], [0.9, 0.7], [0.3, 0.3], [0.3, 0.3]]]])
  labels = np.array([[[-1, -1, 1, 0]]])
  out = np.asarray(_points(variables, points, labels, [[1.0, 1.0]]))[0, 0]
  np.testing.assert_allclose(out[0], p["not_a_point_embed"], atol=1e-6, rtol=0)
  np.testing.assert_allclose(out[1], p["not_a_point_embed"], atol=1e-6, rtol=0)
  table = np.asarray(p["point_embeddings"])
  np.testing.assert_allclose(out[2] - out[3], table[1] - table[0], atol=1e-5, rtol=0)


def test_point_pe_matches_box_corner_pe(variables):
  """A positive point and a box corner at the same place differ only by type embedding."""
  p = _params(variables)
  table = np.asarray(p["point_embeddings"])
  box = np.array([[[0.2, 0.3, 0.8, 0.6]]])
  valid = [[0.5, 0.75]]
  corners = _boxes(variables, box, valid)[0, 0]
  points = _points(variables, box.reshape(1, 1, 2, 2), np.ones((1, 1, 2)), valid)[0, 0]
  np.testing.assert_allclose(corners[0] - points[0], table[2] - table[1], atol=1e-5, rtol=0)
  np.testing.assert_allclose(corners[1] - points[1], table[3] - table[1], atol=1e-5, rtol=0)
  # Labels 2 / 3 (SAM 2's box-corner labels) reproduce the box tokens.
  as_points = _points(variables, box.reshape(1, 1, 2, 2), [[[2, 3]]], valid)[0, 0]
  np.testing.assert_allclose(as_points, corners, atol=1e-6, rtol=0)


def test_dense_pe_values(variables):
  p = _params(variables)
  h, w = 3, 5
  dense = np.asarray(MODEL.apply(variables, (h, w), method=PromptEncoder.dense_pe))
  i, j = 2, 1
  expected = _np_pe([(j + 0.5) / w, (i + 0.5) / h], p["positional_encoding_gaussian_matrix"])
  np.testing.assert_allclose(dense[i, j], expected, atol=1e-5, rtol=0)


def test_dense_pe_equals_point_pe_at_pixel_centres(variables):
  """On a canvas the size of the grid, cell (i, j) is the point (j / W, i / H)."""
  p = _params(variables)
  h, w = CANVAS_HW
  dense = MODEL.apply(variables, (h, w), method=PromptEncoder.dense_pe)
  ij = np.array([[0, 0], [5, 7], [31, 47]])
  xy = np.stack([ij[:, 1] / w, ij[:, 0] / h], -1)
  pts = _points(variables, xy[None, None], np.ones((1, 1, 3)), [[1.0, 1.0]])[0, 0]
  np.testing.assert_allclose(
      pts - np.asarray(p["point_embeddings"])[1], dense[ij[:, 0], ij[:, 1]], atol=1e-5, rtol=0)


def test_no_mask_embed_is_the_param(variables):
  np.testing.assert_array_equal(
      MODEL.apply(variables, method=PromptEncoder.no_mask_embed), _params(variables)["no_mask_embed"])


def test_params_have_known_logical_axes(variables):
  assert len(assert_known_axis_names(variables["params"])) == 4
  p = _params(variables)
  assert p["point_embeddings"].shape == (4, D)
  assert p["positional_encoding_gaussian_matrix"].shape == (2, D // 2)
