"""SAM ViT tower: shapes, windows, rel-pos tables, locality, a numpy attention reference."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax.models import sam_vit
from axis_names import assert_known_axis_names

CFG = sam_vit.SamViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4,
                           mlp_dim=48, window_size=3, global_blocks=(1,), out_channels=16,
                           pretrain_grid=6)
WINDOWED = sam_vit.SamViTConfig(**{**CFG.__dict__, "global_blocks": ()})


def _perturbed(params, seed=1, scale=0.05):
  """Random offsets on every leaf, so zero-initialized rel-pos tables matter too."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten(
      [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def _jitted(module):
  """(init, apply) jitted once per module; eager op-by-op dispatch is slow on CPU."""
  return jax.jit(module.init), jax.jit(module.apply)


def _apply(module, params, *args):
  return _jitted(module)[1]({"params": params}, *args)


def _init_params(module, *args):
  return _perturbed(nn.unbox(_jitted(module)[0](jax.random.PRNGKey(0), *args)["params"]))


@pytest.fixture(scope="module")
def model_and_params():
  model = sam_vit.SamViT(CFG)
  variables = _jitted(model)[0](jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
  return model, variables, _perturbed(nn.unbox(variables["params"]))


def _image(key, h, w, b=2):
  return jax.random.randint(key, (b, h, w, 3), 0, 256).astype(jnp.uint8)


def test_output_shapes_for_several_image_sizes(model_and_params):
  model, _, params = model_and_params
  for h, w in [(32, 32), (40, 56)]:  # 4x4 and 5x7 (padded windows) from a 6x6 table
    out = _apply(model, params, _image(jax.random.PRNGKey(2), h, w))
    assert out.shape == (2, h // 8, w // 8, CFG.out_channels) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def test_parameter_shapes_and_logical_axes(model_and_params):
  _, variables, params = model_and_params
  assert params["pos_embed"].shape == (36, 32)
  assert params["blocks_0"]["attn"]["rel_pos_h"].shape == (2 * 3 - 1, 8)  # window
  assert params["blocks_1"]["attn"]["rel_pos_w"].shape == (2 * 6 - 1, 8)  # pretrain grid
  assert set(params["neck"]["conv1"]) == {"kernel"}  # no conv biases in the neck
  assert_known_axis_names(variables["params"])


@pytest.mark.parametrize("h,w", [(6, 6), (5, 7), (1, 4)])
def test_window_partition_round_trip(h, w):
  x = jax.random.normal(jax.random.PRNGKey(3), (2, h, w, 5))
  windows, padded = sam_vit.window_partition(x, 3)
  assert padded == (-(-h // 3) * 3, -(-w // 3) * 3)
  assert windows.shape == (2 * padded[0] * padded[1] // 9, 3, 3, 5)
  np.testing.assert_array_equal(sam_vit.window_unpartition(windows, 3, padded, (h, w)), x)
  # Window (0, 1) of image 0 holds rows 0..2, columns 3..5; padding is zeros.
  n_w = padded[1] // 3
  if n_w > 1:
    expected = jnp.pad(x, ((0, 0), (0, padded[0] - h), (0, padded[1] - w), (0, 0)))[0, :3, 3:6]
    np.testing.assert_array_equal(windows[1], expected)


def test_get_rel_pos_is_the_table_when_sizes_match():
  table = jax.random.normal(jax.random.PRNGKey(4), (2 * 4 - 1, 3))
  rel = sam_vit.get_rel_pos(4, 4, table)
  for i in range(4):
    for j in range(4):
      np.testing.assert_array_equal(rel[i, j], table[i - j + 3])


def test_get_rel_pos_interpolates_linearly():
  table = jnp.arange(7.0)[:, None] * jnp.array([1.0, -2.0])  # a linear table
  rel = sam_vit.get_rel_pos(3, 3, table)  # resized 7 -> 5: sources 0.2, 1.6, 3.0, 4.4, 5.8
  resized = np.array([0.2, 1.6, 3.0, 4.4, 5.8])
  for i in range(3):
    for j in range(3):
      np.testing.assert_allclose(rel[i, j], resized[i - j + 2] * np.array([1.0, -2.0]), atol=1e-6)
  scenic = sam_vit.get_rel_pos(3, 3, table[::-1] ** 2, antialias=True)
  ref = jax.image.resize(table[::-1] ** 2, (5, 2), "linear")
  np.testing.assert_allclose(scenic[0, 0], ref[2], atol=1e-5)
  np.testing.assert_allclose(scenic[2, 0], ref[4], atol=1e-5)


def test_get_rel_pos_with_different_query_and_key_sizes():
  table = jnp.arange(7.0)[:, None]
  rel = np.asarray(sam_vit.get_rel_pos(2, 4, table))[..., 0]
  # q coords stretched by 2: (0, 2); index = q - k + 3.
  np.testing.assert_array_equal(rel, [[3, 2, 1, 0], [5, 4, 3, 2]])


def _numpy_attention(params, x, num_heads):
  """SAM's Attention in torch layout: q @ k^T * scale + rel_h + rel_w, rel tables already read."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, h, w, d = x.shape
  dh = d // num_heads
  qkv = (np.asarray(x, np.float64) @ p["qkv"]["kernel"] + p["qkv"]["bias"])
  qkv = qkv.reshape(b, h * w, 3, num_heads, dh).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv  # [B, heads, T, Dh]
  rh = np.asarray(sam_vit.get_rel_pos(h, h, jnp.asarray(p["rel_pos_h"])), np.float64)
  rw = np.asarray(sam_vit.get_rel_pos(w, w, jnp.asarray(p["rel_pos_w"])), np.float64)
  r_q = q.reshape(b, num_heads, h, w, dh)
  rel_h = np.einsum("bnhwc,hkc->bnhwk", r_q, rh)
  rel_w = np.einsum("bnhwc,wkc->bnhwk", r_q, rw)
  logits = (q * dh**-0.5) @ k.transpose(0, 1, 3, 2)
  logits = (logits.reshape(b, num_heads, h, w, h, w) + rel_h[..., :, None]
            + rel_w[..., None, :]).reshape(b, num_heads, h * w, h * w)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, h, w, d)
  return out @ p["proj"]["kernel"] + p["proj"]["bias"]


def test_attention_matches_numpy_reference(model_and_params):
  attn_params = model_and_params[2]["blocks_1"]["attn"]  # global: 11-row tables, 4x4 map
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 4, 4, 32))
  out = _apply(sam_vit.Attention(CFG, CFG.pretrain_grid), attn_params, x)
  np.testing.assert_allclose(out, _numpy_attention(attn_params, x, CFG.num_heads), atol=1e-4)


def test_windowed_block_is_local():
  block = sam_vit.Block(WINDOWED, is_global=False)
  x = jax.random.normal(jax.random.PRNGKey(6), (1, 5, 7, 32))  # padded to 6 x 9
  params = _init_params(block, x)
  y = _apply(block, params, x)
  bump = jax.random.normal(jax.random.PRNGKey(8), (32,))  # not constant: LN would erase it
  y2 = _apply(block, params, x.at[0, 4, 4].add(bump))  # window (1, 1)
  changed = np.abs(np.asarray(y2 - y)).max(-1)[0] > 1e-6
  inside = np.zeros((5, 7), bool)
  inside[3:6, 3:6] = True
  assert changed[inside].all()
  assert not changed[~inside].any()
  global_block = sam_vit.Block(WINDOWED, is_global=True)
  gparams = _init_params(global_block, x)
  gy = _apply(global_block, gparams, x)
  gy2 = _apply(global_block, gparams, x.at[0, 4, 4].add(bump))
  assert (np.abs(np.asarray(gy2 - gy)).max(-1) > 1e-6).all()


def test_model_without_global_blocks_is_local_up_to_the_neck():
  """Patches of one window only reach other windows through the neck's 3x3 conv."""
  model = sam_vit.SamViT(WINDOWED)
  image = _image(jax.random.PRNGKey(8), 48, 48, b=1)  # 6x6 grid, windows of 3x3
  params = _init_params(model, image)
  out = _apply(model, params, image)
  out2 = _apply(model, params, image.at[0, :24, :24].set(0))  # window (0, 0)
  changed = np.abs(np.asarray(out2 - out)).max(-1)[0] > 1e-6
  reach = np.zeros((6, 6), bool)
  reach[:4, :4] = True  # the window plus the conv's one-token halo
  assert changed[:3, :3].all()
  assert not changed[~reach].any()


def test_pos_embed_resize_modes(model_and_params):
  _, _, params = model_and_params
  image = _image(jax.random.PRNGKey(9), 32, 32)
  torch_like = _apply(sam_vit.SamViT(CFG), params, image)
  scenic_cfg = sam_vit.SamViTConfig(**{**CFG.__dict__, "resize_like_scenic": True})
  scenic = _apply(sam_vit.SamViT(scenic_cfg), params, image)
  assert np.abs(np.asarray(torch_like - scenic)).max() > 1e-3
  # On the pretrain grid (6x6) both resizes (pos-embed and rel-pos) are the identity.
  big = _image(jax.random.PRNGKey(9), 48, 48)
  np.testing.assert_allclose(_apply(sam_vit.SamViT(CFG), params, big),
                             _apply(sam_vit.SamViT(scenic_cfg), params, big), atol=1e-5)


def test_remat_gives_the_same_output(model_and_params):
  _, _, params = model_and_params
  image = _image(jax.random.PRNGKey(10), 32, 32)
  plain = _apply(sam_vit.SamViT(CFG), params, image)
  remat = sam_vit.SamViT(sam_vit.SamViTConfig(**{**CFG.__dict__, "remat": "block"}))
  np.testing.assert_allclose(_apply(remat, params, image), plain, atol=1e-6)



def test_a_normalized_float_image_gives_the_same_output(model_and_params):
  """normalized=True takes float pixels the caller normalized as the tower does (ImageNet stats)."""
  model, _, params = model_and_params
  image = _image(jax.random.PRNGKey(12), 32, 32)
  floats = (np.asarray(image, np.float32) / 255.0 - np.asarray(sam_vit.IMAGENET_MEAN)) / np.asarray(
      sam_vit.IMAGENET_STD)
  out = jax.jit(lambda p, x: model.apply({"params": p}, x, normalized=True))(params, floats)
  np.testing.assert_allclose(out, _apply(model, params, image), atol=1e-5)
