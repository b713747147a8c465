"""resize.py reproduces torch's F.interpolate (bicubic / linear, align_corners=False)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax.models import resize

SIZES = [(2, 4), (4, 2), (5, 5), (7, 3), (3, 7), (16, 27), (64, 24), (24, 27)]


def test_bicubic_upsample_hand_values():
  # torch: F.interpolate([0, 1], size=4, mode='bicubic') with a = -0.75; borders replicate.
  x = jnp.array([0.0, 1.0]).reshape(1, 2, 1)
  y = resize.resize_bicubic(x, (1, 4))
  np.testing.assert_allclose(
      np.asarray(y).ravel(), [-0.10546875, 0.2265625, 0.7734375, 1.10546875], atol=1e-7)


def test_bicubic_downsample_hand_values():
  x = jnp.arange(4.0).reshape(1, 4, 1)
  plain = resize.resize_bicubic(x, (1, 2))
  # taps (0, 0, 1, 2) and (1, 2, 3, 3) with weights (-3/32, 19/32, 19/32, -3/32).
  np.testing.assert_allclose(np.asarray(plain).ravel(), [0.40625, 2.59375], atol=1e-6)
  aa = resize.resize_bicubic(x, (1, 2), a=-0.5, antialias=True)
  # support widened to 4 input pixels, weights renormalized over the 4 valid taps.
  np.testing.assert_allclose(np.asarray(aa).ravel(), [1.109375 / 1.890625, 3 - 1.109375 / 1.890625],
                             atol=1e-6)


def test_linear_hand_values():
  up = resize.resize_linear(jnp.array([0.0, 1.0]), 4)
  np.testing.assert_allclose(np.asarray(up), [0.0, 0.25, 0.75, 1.0], atol=1e-7)
  down = resize.resize_linear(jnp.arange(4.0), 2)
  np.testing.assert_allclose(np.asarray(down), [0.5, 2.5], atol=1e-7)


@pytest.mark.parametrize("antialias", [False, True])
def test_equal_sizes_are_identity(antialias):
  for n in (1, 3, 16):
    np.testing.assert_allclose(resize.bicubic_matrix(n, n, antialias=antialias), np.eye(n),
                               atol=1e-12)
    np.testing.assert_allclose(resize.linear_matrix(n, n, antialias=antialias), np.eye(n),
                               atol=1e-12)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 3))
  assert resize.resize_bicubic(x, (5, 6), antialias=antialias) is x


@pytest.mark.parametrize("in_size,out_size", SIZES)
@pytest.mark.parametrize("antialias", [False, True])
def test_rows_sum_to_one_so_constants_are_preserved(in_size, out_size, antialias):
  for matrix in (resize.bicubic_matrix(in_size, out_size, antialias=antialias),
                 resize.linear_matrix(in_size, out_size, antialias=antialias)):
    assert matrix.shape == (out_size, in_size)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
  x = jnp.full((1, in_size, in_size, 2), 3.25)
  y = resize.resize_bicubic(x, (out_size, out_size), antialias=antialias)
  np.testing.assert_allclose(np.asarray(y), 3.25, atol=1e-5)


@pytest.mark.parametrize("in_size,out_size", [(8, 16), (16, 27), (27, 16), (64, 24)])
@pytest.mark.parametrize("a", [-0.75, -0.5])
def test_linear_ramps_in_interior(in_size, out_size, a):
  """Keys' cubic reproduces linear functions only for a = -0.5; with torch's
  a = -0.75 a ramp is reproduced only where the sample sits on a pixel or
  halfway between two (the weights are then symmetric)."""
  matrix = resize.bicubic_matrix(in_size, out_size, a=a)
  ramp = 2.0 * np.arange(in_size) - 5.0
  scale = in_size / out_size
  src = scale * (np.arange(out_size) + 0.5) - 0.5
  interior = (np.floor(src) - 1 >= 0) & (np.floor(src) + 2 <= in_size - 1)
  assert interior.sum() > out_size // 2
  frac = src - np.floor(src)
  exact = interior if a == -0.5 else interior & np.isclose(frac % 0.5, 0.0)
  np.testing.assert_allclose((matrix @ ramp)[exact], (2.0 * src - 5.0)[exact], atol=1e-9)
  if a == -0.75:
    off = interior & ~np.isclose(frac % 0.5, 0.0)
    assert np.abs((matrix @ ramp)[off] - (2.0 * src - 5.0)[off]).min() > 1e-3


@pytest.mark.parametrize("in_size,out_size", [(4, 9), (16, 27), (27, 16), (64, 24), (10, 3)])
def test_antialiased_matches_jax_image_resize(in_size, out_size):
  """jax.image.resize (a = -0.5, antialias) is torch's antialias=True path."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, in_size, in_size + 1, 3))
  ours = resize.resize_bicubic(x, (out_size, out_size + 2), a=-0.5, antialias=True)
  ref = jax.image.resize(x, (2, out_size, out_size + 2, 3), "bicubic")
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5)
  table = x[0, :, 0, :]
  ours_lin = resize.resize_linear(table, out_size, axis=0, antialias=True)
  ref_lin = jax.image.resize(table, (out_size, 3), "linear")
  np.testing.assert_allclose(np.asarray(ours_lin), np.asarray(ref_lin), atol=2e-5)


def test_plain_a05_upsampling_matches_jax_in_interior_only():
  """Without antialiasing torch replicates borders; jax renormalizes. Interiors agree."""
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 12, 12, 2))
  ours = np.asarray(resize.resize_bicubic(x, (30, 30), a=-0.5))
  ref = np.asarray(jax.image.resize(x, (1, 30, 30, 2), "bicubic"))
  np.testing.assert_allclose(ours[:, 4:-4, 4:-4], ref[:, 4:-4, 4:-4], atol=2e-5)
  assert np.abs(ours[:, 0] - ref[:, 0]).max() > 1e-3


def test_plain_bicubic_differs_from_jax_default():
  """The reason this module exists: jax.image.resize is not torch's plain bicubic."""
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 16, 16, 1))
  ours = np.asarray(resize.resize_bicubic(x, (27, 27)))
  ref = np.asarray(jax.image.resize(x, (1, 27, 27, 1), "bicubic"))
  assert np.abs(ours - ref).max() > 1e-2


def test_jit_and_batch_dims():
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 6, 5, 4))
  fn = jax.jit(resize.resize_bicubic, static_argnames=("out_hw", "a", "antialias"))
  y = fn(x, out_hw=(9, 4))
  assert y.shape == (2, 3, 9, 4, 4) and y.dtype == x.dtype
  expected = np.einsum("oh,pw,...hwc->...opc", resize.bicubic_matrix(6, 9),
                       resize.bicubic_matrix(5, 4), np.asarray(x, np.float64))
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)
  assert resize.resize_bicubic(x.astype(jnp.bfloat16), (9, 4)).dtype == jnp.bfloat16
