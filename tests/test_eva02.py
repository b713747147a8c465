"""EVA02 tower: shapes, pos-embed resizing, RoPE layout and properties, a numpy reference."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax.models import eva02, resize
from axis_names import assert_known_axis_names

CFG = eva02.EVA02Config(image_size=32, patch_size=8, width=32, depth=2, num_heads=4,
                        mlp_dim=48, pretrain_grid=3)


@functools.lru_cache(maxsize=None)
def _jitted_apply(module):
  """Jitted once per module; eager op-by-op dispatch is slow on CPU."""
  return jax.jit(module.apply)


def _apply(module, params, image):
  return _jitted_apply(module)({"params": params}, image)


@pytest.fixture(scope="module")
def model_and_params():
  model = eva02.EVA02ViT(CFG)
  image = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), image)
  # Non-trivial biases and norms so the reference check sees every parameter.
  params = nn.unbox(variables["params"])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = treedef.unflatten(
      [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, variables, params


def _image(key, h, w, b=2):
  return jax.random.randint(key, (b, h, w, 3), 0, 256).astype(jnp.uint8)


def test_output_shapes_for_several_image_sizes(model_and_params):
  model, _, params = model_and_params
  for h, w, grid in [(32, 32, (4, 4)), (48, 40, (6, 5)), (36, 36, (4, 4))]:
    out = _apply(model, params, _image(jax.random.PRNGKey(2), h, w))
    assert out.shape == (2, *grid, CFG.width) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def test_every_parameter_has_known_logical_axes(model_and_params):
  _, variables, _ = model_and_params
  assert_known_axis_names(variables["params"])


def test_attention_bias_layout(model_and_params):
  attn = model_and_params[2]["blocks_0"]["attn"]
  assert "bias" in attn["q_proj"] and "bias" in attn["v_proj"]
  assert set(attn["k_proj"]) == {"kernel"}


def test_pos_embed_resize_keeps_cls_and_is_identity_on_its_grid():
  pos = jax.random.normal(jax.random.PRNGKey(3), (1 + 9, 4))
  np.testing.assert_array_equal(eva02.resize_pos_embed(pos, (3, 3)), pos)
  bigger = eva02.resize_pos_embed(pos, (5, 4))
  assert bigger.shape == (1 + 20, 4)
  np.testing.assert_array_equal(bigger[0], pos[0])
  expected = jax.image.resize(pos[1:].reshape(3, 3, 4), (5, 4, 4), "bicubic")  # = torch antialias
  np.testing.assert_allclose(bigger[1:].reshape(5, 4, 4), expected, atol=1e-5)


def test_rope_table_layout():
  """Dh = 8: bands (1, 1/100); channels [r, r, r/100, r/100, c, c, c/100, c/100]."""
  sin, cos = eva02.rope_sin_cos((2, 3), 8)
  assert sin.shape == cos.shape == (6, 8)
  r, c = 1, 2
  angles = np.array([r, r, r / 100, r / 100, c, c, c / 100, c / 100])
  np.testing.assert_allclose(sin[r * 3 + c], np.sin(angles), atol=1e-6)
  np.testing.assert_allclose(cos[r * 3 + c], np.cos(angles), atol=1e-6)
  sin_ref, _ = eva02.rope_sin_cos((2, 3), 8, ref_hw=(4, 6))  # positions scaled by 2
  np.testing.assert_allclose(sin_ref[r * 3 + c], np.sin(2 * angles), atol=1e-6)


def test_apply_rope_rotates_channel_pairs():
  x = jax.random.normal(jax.random.PRNGKey(4), (1, 6, 2, 8))
  sin, cos = eva02.rope_sin_cos((2, 3), 8)
  y = np.asarray(eva02.apply_rope(x, jnp.asarray(sin), jnp.asarray(cos)))
  xc = np.asarray(x[..., 0::2]) + 1j * np.asarray(x[..., 1::2])
  angle = np.arctan2(sin[:, None, 0::2], cos[:, None, 0::2])  # one angle per channel pair
  rotated = xc * np.exp(1j * angle)
  np.testing.assert_allclose(y[..., 0::2], rotated.real, atol=1e-5)
  np.testing.assert_allclose(y[..., 1::2], rotated.imag, atol=1e-5)


@pytest.mark.parametrize("ref_hw", [None, (8, 8)])
def test_rope_logits_depend_only_on_relative_position(ref_hw):
  grid = (4, 5)
  sin, cos = (jnp.asarray(t) for t in eva02.rope_sin_cos(grid, 16, ref_hw))
  n = grid[0] * grid[1]
  q = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(5), (16,)), (1, n, 1, 16))
  k = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(6), (16,)), (1, n, 1, 16))
  logits = np.einsum("td,sd->ts", np.asarray(eva02.apply_rope(q, sin, cos))[0, :, 0],
                     np.asarray(eva02.apply_rope(k, sin, cos))[0, :, 0])
  by_offset = {}
  rows, cols = np.divmod(np.arange(n), grid[1])
  for t in range(n):
    for s in range(n):
      by_offset.setdefault((rows[t] - rows[s], cols[t] - cols[s]), []).append(logits[t, s])
  spread = max(np.ptp(v) for v in by_offset.values())
  assert spread < 1e-4
  assert np.ptp([v[0] for v in by_offset.values()]) > 0.1  # but they do depend on it


@pytest.mark.parametrize("mode", ["block", "dots_with_no_batch_dims_saveable"])
def test_remat_gives_the_same_output(model_and_params, mode):
  _, _, params = model_and_params
  image = _image(jax.random.PRNGKey(7), 32, 32)
  plain = _apply(eva02.EVA02ViT(CFG), params, image)
  remat = eva02.EVA02ViT(eva02.EVA02Config(**{**CFG.__dict__, "remat": mode}))
  np.testing.assert_allclose(_apply(remat, params, image), plain, atol=1e-6)


def _numpy_reference(params, image, cfg):
  """EVA02 forward written in timm's torch layout (tokens [B, N, C], heads split last)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  def ln(x, q, eps=cfg.layer_norm_eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * q["scale"] + q["bias"]
  def linear(x, q):
    return x @ q["kernel"] + q.get("bias", 0.0)
  x = (np.asarray(image, np.float64) / 255 - eva02.CLIP_MEAN) / eva02.CLIP_STD
  b, hh, ww, _ = x.shape
  ps, d, nh = cfg.patch_size, cfg.width, cfg.num_heads
  h, w = hh // ps, ww // ps
  patches = x[:, :h * ps, :w * ps].reshape(b, h, ps, w, ps, 3).transpose(0, 1, 3, 2, 4, 5)
  tokens = patches.reshape(b, h * w, -1) @ p["patch_embed"]["kernel"].reshape(-1, d)
  tokens = tokens + p["patch_embed"]["bias"]
  x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, d)), tokens], 1)
  grid = p["pos_embed"][1:].reshape(cfg.pretrain_grid, cfg.pretrain_grid, d)
  mh = resize.bicubic_matrix(cfg.pretrain_grid, h, a=-0.5, antialias=True)
  mw = resize.bicubic_matrix(cfg.pretrain_grid, w, a=-0.5, antialias=True)
  grid = np.einsum("oh,pw,hwc->opc", mh, mw, grid).reshape(h * w, d)
  x = x + np.concatenate([p["pos_embed"][:1], grid], 0)
  sin, cos = eva02.rope_sin_cos((h, w), d // nh)
  def rope(t):  # t [B, heads, N, Dh], timm's rot(): [-x1, x0, -x3, x2, ...]
    rot = np.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)
    return t * cos + rot * sin
  for i in range(cfg.depth):
    q_blk = p[f"blocks_{i}"]
    y = ln(x, q_blk["norm1"])
    split = lambda z: z.reshape(b, -1, nh, d // nh).transpose(0, 2, 1, 3)
    q, k, v = (split(linear(y, q_blk["attn"][n])) for n in ("q_proj", "k_proj", "v_proj"))
    q = np.concatenate([q[:, :, :1], rope(q[:, :, 1:])], 2)
    k = np.concatenate([k[:, :, :1], rope(k[:, :, 1:])], 2)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // nh)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn = attn / attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
    x = x + linear(y, q_blk["attn"]["proj"])
    y = ln(x, q_blk["norm2"])
    g = linear(y, q_blk["mlp"]["fc1_g"])
    y = g / (1 + np.exp(-g)) * linear(y, q_blk["mlp"]["fc1_x"])
    x = x + linear(ln(y, q_blk["mlp"]["norm"]), q_blk["mlp"]["fc2"])
  return ln(x, p["norm"])[:, 1:].reshape(b, h, w, d)


def test_matches_numpy_reference(model_and_params):
  model, _, params = model_and_params
  image = _image(jax.random.PRNGKey(8), 40, 48)
  out = _apply(model, params, image)
  ref = _numpy_reference(params, image, CFG)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-4)


def test_bfloat16_compute_keeps_float32_params_and_output(model_and_params):
  _, _, params = model_and_params
  cfg = eva02.EVA02Config(**{**CFG.__dict__, "dtype": jnp.bfloat16})
  image = _image(jax.random.PRNGKey(9), 32, 32)
  out = _apply(eva02.EVA02ViT(cfg), params, image)
  ref = _apply(eva02.EVA02ViT(CFG), params, image)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.1)


def test_a_normalized_float_image_gives_the_same_output(model_and_params):
  """normalized=True takes float pixels the caller normalized as the tower does (CLIP stats)."""
  model, _, params = model_and_params
  image = _image(jax.random.PRNGKey(11), 32, 32)
  floats = (np.asarray(image, np.float32) / 255.0 - np.asarray(eva02.CLIP_MEAN)) / np.asarray(
      eva02.CLIP_STD)
  out = jax.jit(lambda p, x: model.apply({"params": p}, x, normalized=True))(params, floats)
  np.testing.assert_allclose(out, _apply(model, params, image), atol=1e-5)
  with pytest.raises(ValueError, match="float image"):
    model.apply({"params": params}, image, normalized=True)
