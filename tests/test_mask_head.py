"""The referring-segmentation head in the toy composer (models/heads/mask.py).

Shapes and axis names; the gate: at init (alpha = 0) the mask decoder sees exactly SAM's box
tokens of the predicted box, so the masks equal SAM's decoder run by hand on them; the key mask
makes the adapter blind to decoder padding (the official adapter is not); the box is cut from
the backward pass while the adapter trains.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_fixtures as mf
from axis_names import assert_known_axis_names
from pixelllm_jax.models.heads.localization import points_at, points_to_boxes
from pixelllm_jax.models.heads.mask import MaskAdapter, text_positions
from pixelllm_jax.models.mask_decoder import MaskDecoder
from pixelllm_jax.models.pixel_llm import PixelLLM, PixelLLMConfig
from pixelllm_jax.models.prompt_encoder import PromptEncoder

B, K, N, L, LC = 2, 2, 3, 6, 4


def _config(**head):
  return dataclasses.replace(mf.toy_config(), mask_head=mf.toy_mask_head(**head))


@pytest.fixture(scope="module")
def batch():
  return mf.random_batch(0, b=B, k=K, n=N, l=L, lc=LC)


def _positions(batch):
  """The position whose target is EOS, per slot (what the model API passes)."""
  return jnp.asarray(np.argmax(batch.decoder_target_tokens == mf.EOS_ID, axis=-1), jnp.int32)


@pytest.fixture(scope="module")
def setup(batch):
  model = PixelLLM(_config())
  boxed = jax.jit(lambda b, pos: model.init({"params": jax.random.key(0)}, **mf.inputs(b),
                                            mask_positions=pos))(batch, _positions(batch))
  forward = jax.jit(lambda v, b, pos: model.apply(v, **mf.inputs(b), mask_positions=pos))
  return model, boxed["params"], forward


def _with_alpha(params, alpha):
  adapter = {**params["mask_adapter"], "alpha": jnp.asarray(alpha, jnp.float32)}
  return {"params": {**params, "mask_adapter": adapter}}


def test_shapes_axis_names_and_submodules(setup, batch):
  model, boxed, forward = setup
  named = assert_known_axis_names(boxed)
  paths = {p for p, _ in named}
  assert any(p.startswith("mask_adapter/transformer/") for p in paths)
  assert "mask_decoder/iou_token" in paths and "mask_adapter/alpha" in paths
  params = nn.meta.unbox(boxed)
  assert params["mask_adapter"]["alpha"].shape == () and float(params["mask_adapter"]["alpha"]) == 0
  assert params["mask_adapter"]["queries"].shape == (2, 16)
  out = forward({"params": params}, batch, _positions(batch))
  grid = mf.IMAGE_SIZE // 16  # toy SAM: patch 16 -> a 2 x 2 map; masks are 4x that
  assert out.mask_logits.shape == (B, N, 4 * grid, 4 * grid)
  assert out.mask_iou.shape == (B, N)
  assert out.mask_logits.dtype == jnp.float32 and np.isfinite(np.asarray(out.mask_logits)).all()
  # Without mask_positions the pass has no masks (and the same text outputs).
  plain = jax.jit(lambda v, b: model.apply(v, **mf.inputs(b)))({"params": params}, batch)
  assert plain.mask_logits is None and plain.mask_iou is None
  np.testing.assert_array_equal(plain.points, out.points)


def test_gate_at_init_gives_the_decoder_exactly_sams_box_tokens(setup, batch):
  model, boxed, forward = setup
  params = nn.meta.unbox(boxed)
  pos = _positions(batch)
  out = forward({"params": params}, batch, pos)

  # By hand: the box of the predicted points at `pos`, SAM's prompt encoder, SAM's decoder.
  cfg = model.config
  sam_map = model.apply({"params": params}, batch.image,
                        method=PixelLLM.image_features).maps["sam"]
  boxes = jnp.clip(points_to_boxes(points_at(out.points, pos)), 0.0, 1.0)
  encoder = PromptEncoder(cfg.prompt_encoder)
  pe_vars = {"params": params["prompt_encoder"]}
  tokens = encoder.apply(pe_vars, boxes, batch.image_valid_hw, method=PromptEncoder.embed_boxes)
  image_pe = encoder.apply(pe_vars, sam_map.shape[1:3], method=PromptEncoder.dense_pe)
  no_mask = encoder.apply(pe_vars, method=PromptEncoder.no_mask_embed)
  logits, iou = MaskDecoder(cfg.mask_head.decoder).apply(
      {"params": params["mask_decoder"]}, sam_map, image_pe, tokens, no_mask, False)
  np.testing.assert_allclose(out.mask_logits, logits[:, :, 0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(out.mask_iou, iou[:, :, 0], rtol=0, atol=1e-6)

  # An open gate adds the adapter's tokens: the masks move.
  opened = forward(_with_alpha(params, 0.5), batch, pos)
  assert np.abs(np.asarray(opened.mask_logits - logits[:, :, 0])).max() > 1e-3


@pytest.mark.parametrize("mask_text_padding", [True, False])
def test_adapter_ignores_decoder_padding_only_with_the_key_mask(mask_text_padding):
  """Hidden states of 4 more (padded) positions after each slot's box position change the
  adapter's tokens only without the key mask (the official adapter)."""
  adapter = MaskAdapter(mf.toy_mask_head(mask_text_padding=mask_text_padding))
  ks = jax.random.split(jax.random.key(0), 3)
  visual = jax.random.normal(ks[0], (B, N, 4, mf.WIDTH))
  hidden = jax.random.normal(ks[1], (B, N, L, mf.WIDTH))
  padded = jnp.concatenate([hidden, jax.random.normal(ks[2], (B, N, 4, mf.WIDTH))], axis=2)
  pos = jnp.asarray(np.random.default_rng(0).integers(0, L, (B, N)), jnp.int32)
  variables = adapter.init(jax.random.key(1), visual, hidden, text_positions(pos, L))
  variables = {"params": {**variables["params"], "alpha": jnp.asarray(0.8)}}
  apply = jax.jit(adapter.apply)
  short = apply(variables, visual, hidden, text_positions(pos, L))
  long = apply(variables, visual, padded, text_positions(pos, L + 4))
  assert short.shape == (B, N, 2, 16)
  if mask_text_padding:
    np.testing.assert_allclose(short, long, rtol=0, atol=1e-5)
  else:  # official: the queries read the padded positions' hidden states
    assert np.abs(np.asarray(short - long)).max() > 1e-2


def test_the_box_is_cut_from_the_backward_pass_and_the_adapter_trains(setup, batch):
  model, boxed, _ = setup
  params = _with_alpha(nn.meta.unbox(boxed), 0.3)["params"]
  pos = _positions(batch)

  def mask_sum(p):
    return jnp.sum(model.apply({"params": p}, **mf.inputs(batch), mask_positions=pos)
                   .mask_logits ** 2)

  grads = jax.jit(jax.grad(mask_sum))(params)
  norm = lambda tree: float(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree)))  # noqa: E731
  assert norm(grads["loc_head"]) == 0.0  # only the box reads the points: stop-gradient
  assert norm(grads["mask_adapter"]) > 0 and norm(grads["mask_decoder"]) > 0
  assert norm(grads["t5"]) > 0  # the adapter reads the decoder's hidden states


def test_config_checks():
  cfg = mf.toy_config()
  with pytest.raises(ValueError, match="one SAM width"):
    dataclasses.replace(cfg, mask_head=dataclasses.replace(
        mf.toy_mask_head(), decoder=dataclasses.replace(mf.toy_mask_head().decoder,
                                                        transformer_dim=24)))
  with pytest.raises(ValueError, match="needs the SAM tower"):
    dataclasses.replace(mf.toy_config(sam=False), mask_head=mf.toy_mask_head())
  with pytest.raises(ValueError, match="points_per_token must be 2"):
    dataclasses.replace(mf.toy_config(points_per_token=1), mask_head=mf.toy_mask_head())
  assert isinstance(_config(), PixelLLMConfig)
  # The head's compute dtype reaches SAM's decoder.
  head = mf.toy_mask_head(dtype=jnp.bfloat16)
  assert head.decoder.dtype == jnp.bfloat16
