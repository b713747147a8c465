"""fuse_feature_maps: resize to the largest grid (torch bicubic), concatenate channels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax.models import fusion, resize


def _map(seed, h, w, c, b=2):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, h, w, c))


def test_single_map_passes_through_unchanged():
  x = _map(0, 3, 4, 5)
  np.testing.assert_array_equal(fusion.fuse_feature_maps([x]), x)


def test_eva_and_sam_like_maps_fuse_on_the_larger_grid():
  eva, sam = _map(1, 5, 5, 6), _map(2, 4, 4, 3)
  fused = fusion.fuse_feature_maps([eva, sam])
  assert fused.shape == (2, 5, 5, 9) and fused.dtype == jnp.float32
  np.testing.assert_array_equal(fused[..., :6], eva)  # already on the grid: untouched
  m = resize.bicubic_matrix(4, 5)  # a = -0.75, no antialias
  expected = np.einsum("oh,pw,bhwc->bopc", m, m, np.asarray(sam, np.float64))
  np.testing.assert_allclose(fused[..., 6:], expected, atol=1e-5)


def test_channel_order_follows_input_order_and_constants_survive():
  small = jnp.full((1, 2, 2, 1), 7.0)
  big = _map(3, 3, 3, 2, b=1)
  fused = fusion.fuse_feature_maps([small, big])
  np.testing.assert_allclose(fused[..., 0], 7.0, atol=1e-5)
  np.testing.assert_array_equal(fused[..., 1:], big)


def test_target_grid_takes_the_largest_height_and_width():
  fused = fusion.fuse_feature_maps([_map(4, 4, 2, 1), _map(5, 2, 6, 1)])
  assert fused.shape == (2, 4, 6, 2)


def test_jit_and_errors():
  maps = [_map(6, 5, 5, 2), _map(7, 4, 4, 2)]
  np.testing.assert_allclose(jax.jit(fusion.fuse_feature_maps)(maps),
                             fusion.fuse_feature_maps(maps), atol=1e-6)
  with pytest.raises(ValueError):
    fusion.fuse_feature_maps([])
  with pytest.raises(ValueError):
    fusion.fuse_feature_maps([_map(8, 2, 2, 1, b=1), _map(9, 2, 2, 1, b=2)])
