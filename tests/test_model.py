"""The model API (pixelllm_jax/model.py) on the toy composer: predict, score, the start-up checks,
the one canvas, the freezing switch, per-tower feature maps, point prompts, and the policies."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_fixtures as mf
from pixelllm_jax import decoding, partitioning
from pixelllm_jax.batch import EOS_ID
from pixelllm_jax.model import DecodeSettings, PixelLLMModel, points_to_boxes
from pixelllm_jax.models.pixel_llm import PixelLLM, PixelLLMConfig
from pixelllm_jax.models.prompt_encoder import POSITIVE
from pixelllm_jax.train import trainer

B, K, N, L, LC = 2, 2, 3, 6, 4


@pytest.fixture(scope="module")
def model():
  return PixelLLMModel(mf.toy_config(lora_rank=2))


@pytest.fixture(scope="module")
def batch():
  return mf.random_batch(0, b=B, k=K, n=N, l=L, lc=LC)


@pytest.fixture(scope="module")
def params(model, batch):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch))


def test_teacher_forced_predictions_read_the_given_targets(model, params, batch):
  pred = jax.jit(lambda p, b: model.predict(p, b, DecodeSettings("teacher_forced")))(params, batch)
  points_in = np.asarray(jax.jit(model.apply)(params, batch).points)  # at decoder input positions
  np.testing.assert_array_equal(pred.tokens, batch.decoder_target_tokens)
  # points[t] localizes target t, read at input position t + 1.
  np.testing.assert_allclose(pred.points[:, :, :L - 1], points_in[:, :, 1:], atol=1e-6)
  for b, n in np.ndindex(B, N):
    eos = int(np.argmax(batch.decoder_target_tokens[b, n] == EOS_ID))
    corners = points_in[b, n, eos]
    np.testing.assert_allclose(pred.boxes[b, n], [*corners.min(0), *corners.max(0)], atol=1e-6)


def test_greedy_predictions_are_the_cached_decoding(model, params, batch):
  pred = jax.jit(lambda p, b: model.predict(p, b, DecodeSettings("greedy", max_len=L)))(
      params, batch)
  @jax.jit
  def decode(p, b):
    encoded = model.module.apply({"params": p}, **mf.encode_inputs(b), method=PixelLLM.encode)
    return decoding.greedy_decode_pixel_llm(model.module, {"params": p}, encoded, L)

  decoded = jax.device_get(decode(params, batch))
  np.testing.assert_array_equal(pred.tokens, decoded.tokens)
  np.testing.assert_allclose(pred.points, decoded.points, atol=1e-6)
  for b, n in np.ndindex(B, N):
    tokens = np.asarray(decoded.tokens[b, n])
    end = int(np.argmax(tokens == EOS_ID)) if (tokens == EOS_ID).any() else L
    np.testing.assert_allclose(pred.boxes[b, n],
                               points_to_boxes(decoded.points[b, n, max(end - 1, 0)]), atol=1e-6)


def test_score_is_the_target_log_likelihood(model, params, batch):
  scores = jax.jit(model.score)(params, batch)
  logits = np.asarray(jax.jit(model.apply)(params, batch).logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  targets = batch.decoder_target_tokens
  want = (np.take_along_axis(logp, targets[..., None], -1)[..., 0] * (targets > 0)).sum(-1)
  assert scores.shape == (B, N)
  np.testing.assert_allclose(scores, want, rtol=1e-5)


def test_decode_settings_are_checked():
  with pytest.raises(ValueError, match="mode"):
    DecodeSettings("sample")
  with pytest.raises(ValueError, match="beam_size"):
    DecodeSettings("greedy", beam_size=3)
  with pytest.raises(ValueError, match="max_len"):
    DecodeSettings("greedy", max_len=0)


def test_one_canvas_sets_every_tower_size():
  cfg = dataclasses.replace(mf.toy_config(), image_size=48)
  assert cfg.eva02.image_size == cfg.sam.image_size == 48
  assert cfg.prompt_encoder.input_image_size == (48, 48)
  with pytest.raises(ValueError, match="frozen names"):
    dataclasses.replace(mf.toy_config(), frozen=("sam", "vision"))


def test_canvas_mismatch_is_an_error_at_start_up(model, tmp_path):
  """The data's images are 16 px, the model's canvas 32: train stops before building anything."""
  from test_train_step import ToyIterator, partitioner_of, toy_optimizer
  with pytest.raises(ValueError, match=r"images are 4x4 but the model's canvas is 32x32"):
    trainer.train(model_dir=str(tmp_path), model=model, train_data=ToyIterator(),
                  num_steps=1, optimizer=toy_optimizer(), partitioner=partitioner_of(1, 1))
  assert not (tmp_path / "checkpoints").exists()
  small = mf.random_batch(0, image_size=16)
  with pytest.raises(ValueError, match="canvas_size=32"):
    model.check_batch(small)
  with pytest.raises(ValueError, match="points per token"):
    model.check_batch(mf.random_batch(0, p=1))


def test_trainable_follows_the_freezing_switch():
  cfg = dataclasses.replace(mf.toy_config(lora_rank=2), frozen=("sam", "prompt_encoder", "t5"))
  assert not cfg.trainable(("sam", "blocks_0", "attn", "qkv", "kernel"))
  assert not cfg.trainable(("prompt_encoder", "no_mask_embed"))
  assert not cfg.trainable(("t5", "decoder", "layers_0", "self_attention", "query", "kernel"))
  assert cfg.trainable(("t5", "decoder", "layers_0", "self_attention", "query", "lora_a"))
  assert cfg.trainable(("eva02", "norm", "scale")) and cfg.trainable(("loc_head", "out", "bias"))
  # The official refseg stage: T5 entirely frozen, its LoRA adapters too.
  locked = dataclasses.replace(cfg, frozen_lora=True)
  assert not locked.trainable(("t5", "decoder", "layers_0", "self_attention", "query", "lora_a"))
  assert locked.trainable(("loc_head", "out", "bias"))


@pytest.mark.parametrize("frozen", [(), ("eva02", "sam", "prompt_encoder")])
def test_frozen_input_towers_get_no_gradient(model, params, batch, frozen):
  model = PixelLLMModel(dataclasses.replace(model.config, frozen=frozen))  # same parameters
  grads = jax.jit(jax.grad(lambda p: model.loss(p, batch, jax.random.key(1))[0]))(params)
  for tower in ("eva02", "sam", "prompt_encoder"):
    biggest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[tower]))
    assert (biggest == 0.0) == (tower in frozen), (tower, biggest)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["extractor"])) > 0


def test_features_keep_each_tower_map(model, params, batch):
  features = model.module.apply({"params": params}, batch.image,
                                method=lambda m, image: m.image_features(image))
  assert features.maps["eva02"].shape == (B, 4, 4, mf.WIDTH)       # patch 8 on 32 px
  assert features.maps["sam"].shape == (B, 2, 2, 16)               # patch 16, 16 channels
  assert features.fused.shape == (B, 4, 4, mf.WIDTH + 16)


def test_point_prompts_equal_the_box_grid_they_describe(model, params, batch):
  """A box through the 3 x 3 grid encoding equals giving the grid as positive point prompts."""
  model = PixelLLMModel(dataclasses.replace(model.config, prompt_points_per_side=3))

  def tokens(m, image, valid, boxes=None, points=None, labels=None):
    fused = m.image_features(image).fused
    return m.visual_tokens(fused, valid, prompt_boxes=boxes, prompt_points=points,
                           prompt_labels=labels)

  from pixelllm_jax.models.pixel_llm import box_grid_points
  points = box_grid_points(jnp.asarray(batch.prompt_boxes), 3)
  labels = jnp.full(points.shape[:-1], POSITIVE, jnp.int32)
  v = {"params": params}
  apply = jax.jit(lambda *args: model.module.apply(v, *args, method=tokens))
  from_boxes = apply(batch.image, batch.image_valid_hw, batch.prompt_boxes)
  from_points = apply(batch.image, batch.image_valid_hw, None, points, labels)
  np.testing.assert_allclose(from_points, from_boxes, atol=1e-6)
  with pytest.raises(ValueError, match="not both"):
    model.module.apply(v, batch.image, batch.image_valid_hw, batch.prompt_boxes, points, labels,
                       method=tokens)


def test_dtype_policy_computes_in_bfloat16_with_float32_master_weights(batch):
  policy = partitioning.DtypePolicy(compute_dtype="bfloat16",
                                    tower_dtypes=(("loc_head", "float32"),))
  model = PixelLLMModel(mf.toy_config(), dtype=policy)
  assert model.config.t5.dtype == model.config.eva02.dtype == jnp.bfloat16
  assert model.config.loc_head.dtype == jnp.float32 and model.config.dtype == jnp.bfloat16
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), batch))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  params = jax.tree.map(lambda x: jnp.full(x.shape, 0.02, x.dtype), params)
  loss, metrics = jax.jit(lambda p: model.loss(p, batch, jax.random.key(1)))(params)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  stored = PixelLLMModel(mf.toy_config(), dtype=partitioning.DtypePolicy(param_dtype="bfloat16"))
  params16 = jax.eval_shape(stored.init, jax.random.key(0), batch)
  assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(params16))} == {jnp.dtype("bfloat16")}
  with pytest.raises(ValueError, match="towers \\['vision'\\]"):
    PixelLLMModel(mf.toy_config(),
                  dtype=partitioning.DtypePolicy(tower_dtypes=(("vision", "bfloat16"),)))
  with pytest.raises(ValueError, match="not a floating dtype"):
    partitioning.DtypePolicy(compute_dtype="int8")


def test_remat_policy_reaches_every_tower():
  model = PixelLLMModel(mf.toy_config(), remat=partitioning.RematPolicy(
      mode="block", tower_modes=(("t5", "dots_with_no_batch_dims_saveable"),)))
  assert model.config.eva02.remat == model.config.sam.remat == "block"
  assert model.config.t5.remat == "dots_with_no_batch_dims_saveable"
  with pytest.raises(ValueError, match="remat mode 'often'"):
    partitioning.RematPolicy(mode="often")
  with pytest.raises(ValueError, match="towers \\['loc_head'\\]"):
    PixelLLMModel(mf.toy_config(),
                  remat=partitioning.RematPolicy(tower_modes=(("loc_head", "block"),)))


def test_config_rejects_a_missing_image_tower():
  with pytest.raises(ValueError, match="at least one image encoder"):
    PixelLLMConfig(t5=mf.toy_config().t5, prompt_encoder=mf.toy_config().prompt_encoder,
                   extractor=mf.toy_config().extractor)
