"""The composed PixelLLM at toy size: shapes, parameter axis names, and the model's contracts.

Contracts: padding does not change real outputs; the decoder is causal and the
localization of a token does not depend on later tokens; caption slots are independent; the
prompt gather routes each slot to its own prompt; cached decoding equals the teacher-forced pass;
`loc_grad_to_lm=False` cuts the point loss from the LM; a fresh LoRA is the rank-0 model. Plus the
losses on hand-computed values.

Compilation dominates the runtime on CPU, so one model is initialized per module and every
contract that keeps the base batch shapes reuses one jitted forward.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import model_fixtures as mf
from pixelllm_jax import decoding, losses
from pixelllm_jax.batch import Batch, Output
from pixelllm_jax.tasks import TASKS
from pixelllm_jax.lora import LORA_PARAM_NAMES
from pixelllm_jax.models.pixel_llm import Encoded, PixelLLM
from axis_names import assert_known_axis_names

B, K, N, L, LC = 2, 2, 3, 6, 4
LORA_RANK = 2


@pytest.fixture(scope="module")
def model():
  return PixelLLM(mf.toy_config(lora_rank=LORA_RANK))


@pytest.fixture(scope="module")
def batch():
  return mf.random_batch(0, b=B, k=K, n=N, l=L, lc=LC)


@pytest.fixture(scope="module")
def boxed_params(model, batch):
  return jax.jit(lambda b: model.init({"params": jax.random.key(0)}, **mf.inputs(b)))(batch)[
      "params"]


@pytest.fixture(scope="module")
def variables(boxed_params):
  return {"params": nn.meta.unbox(boxed_params)}


@pytest.fixture(scope="module")
def forward(model, variables):
  """Jitted teacher-forced forward of the LoRA model on its init params: Batch -> Output."""
  fn = jax.jit(lambda v, b: model.apply(v, **mf.inputs(b)))
  return lambda b: fn(variables, b)


@pytest.fixture(scope="module")
def base_out(forward, batch):
  return forward(batch)


def _assert_close(a, b, atol, what=""):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0, err_msg=what)


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ------------------------------------------------------------------------------------ shapes


def test_call_encode_decode_shapes_and_dtypes(model, variables, batch, base_out):
  v = mf.VOCAB
  assert base_out.logits.shape == (B, N, L, v) and base_out.logits.dtype == jnp.float32
  assert base_out.points.shape == (B, N, L, mf.POINTS, 2) and base_out.points.dtype == jnp.float32
  assert base_out.hidden.shape == (B, N, L, mf.WIDTH) and base_out.hidden.dtype == jnp.float32
  assert np.all(np.isfinite(base_out.logits)) and np.all(np.isfinite(base_out.points))

  enc = jax.jit(lambda v_, b: model.apply(v_, **mf.encode_inputs(b), method=PixelLLM.encode))(
      variables, batch)
  assert isinstance(enc, Encoded)
  le = mf.NUM_QUERIES + LC
  assert enc.encoder_out.shape == (B, N, le, mf.WIDTH) and enc.encoder_out.dtype == jnp.float32
  assert enc.encoder_mask.shape == (B, N, le) and enc.encoder_mask.dtype == jnp.bool_
  # Visual tokens are always attended; the text part follows the context padding.
  np.testing.assert_array_equal(enc.encoder_mask[..., :mf.NUM_QUERIES], True)
  np.testing.assert_array_equal(enc.encoder_mask[..., mf.NUM_QUERIES:], batch.context_tokens > 0)

  out = _decode(model)(variables, enc, jnp.asarray(batch.decoder_input_tokens))
  assert isinstance(out, Output)
  for name in ("logits", "points", "hidden"):
    _assert_close(getattr(out, name), getattr(base_out, name), 1e-6, name)


# ------------------------------------------------------------------------ parameter axis names


def test_every_parameter_has_known_logical_axis_names(boxed_params):
  paths = [path for path, _ in assert_known_axis_names(boxed_params)]
  towers = {path.split("/")[0] for path in paths}
  lora_leaves = sum(path.split("/")[-1] in LORA_PARAM_NAMES for path in paths)
  # The walk really covered the whole composed model, LoRA included.
  assert {"eva02", "sam", "prompt_encoder", "extractor", "visual_proj", "t5",
          "loc_head"} <= towers, towers
  assert lora_leaves > 0


# ---------------------------------------------------------------------------------- contracts


def test_padding_does_not_change_real_outputs(forward, batch, base_out):
  """(a) Two more 0s after every context and two more decoder positions of pad (0) tokens."""
  extra = 2

  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return np.pad(x, widths)

  padded = batch.replace(
      context_tokens=pad(batch.context_tokens, 2),
      decoder_input_tokens=pad(batch.decoder_input_tokens, 2),
      decoder_target_tokens=pad(batch.decoder_target_tokens, 2),
      decoder_loss_weights=pad(batch.decoder_loss_weights, 2),
      point_targets=pad(batch.point_targets, 2),
      point_weights=pad(batch.point_weights, 2),
  )
  out = forward(padded)
  assert out.logits.shape[2] == L + extra
  _assert_close(out.logits[:, :, :L], base_out.logits, 1e-5, "logits")
  _assert_close(out.points[:, :, :L], base_out.points, 1e-5, "points")


def test_decoder_is_causal(forward, batch, base_out):
  """(b) Changing the decoder input at position t changes nothing at positions < t."""
  t = 3
  tokens = batch.decoder_input_tokens.copy()
  tokens[..., t] = (tokens[..., t] + 7) % (mf.VOCAB - mf.FIRST_WORD_ID) + mf.FIRST_WORD_ID
  out = forward(batch.replace(decoder_input_tokens=tokens))
  _assert_close(out.logits[..., :t, :], base_out.logits[..., :t, :], 1e-6, "logits")
  _assert_close(out.points[..., :t, :, :], base_out.points[..., :t, :, :], 1e-6, "points")
  assert _max_diff(out.logits[..., t, :], base_out.logits[..., t, :]) > 1e-3


def test_localization_of_a_token_ignores_later_tokens(forward, batch, base_out):
  """(c) Points at positions <= t are unchanged when every token after t changes."""
  t = 2
  r = np.random.RandomState(1)
  tokens = batch.decoder_input_tokens.copy()
  tokens[..., t + 1:] = r.randint(mf.FIRST_WORD_ID, mf.VOCAB, size=tokens[..., t + 1:].shape)
  out = forward(batch.replace(decoder_input_tokens=tokens))
  _assert_close(out.points[..., :t + 1, :, :], base_out.points[..., :t + 1, :, :], 1e-6)
  assert _max_diff(out.points[..., t + 1:, :, :], base_out.points[..., t + 1:, :, :]) > 1e-4


def test_slots_and_images_are_independent(forward, batch, base_out):
  """(d) Changing slot j's context and tokens (and prompt) leaves the other slots unchanged;
  changing one image leaves the other images' outputs unchanged."""
  j = 1
  r = np.random.RandomState(2)
  other = mf.random_batch(5, b=B, k=K, n=N, l=L, lc=LC)
  changed = batch.replace(
      context_tokens=_set_slot(batch.context_tokens, j, other.context_tokens),
      decoder_input_tokens=_set_slot(batch.decoder_input_tokens, j, other.decoder_input_tokens),
      prompt_index=_set_slot(batch.prompt_index, j, 1 - batch.prompt_index))
  out = forward(changed)
  keep = [i for i in range(N) if i != j]
  _assert_close(out.logits[:, keep], base_out.logits[:, keep], 1e-6, "logits")
  _assert_close(out.points[:, keep], base_out.points[:, keep], 1e-6, "points")
  assert _max_diff(out.logits[:, j], base_out.logits[:, j]) > 1e-3

  image = batch.image.copy()
  image[1] = r.randint(0, 256, size=image[1].shape)
  out = forward(batch.replace(image=image))
  _assert_close(out.logits[0], base_out.logits[0], 1e-6, "logits of the unchanged image")
  _assert_close(out.points[0], base_out.points[0], 1e-6, "points of the unchanged image")
  assert _max_diff(out.logits[1], base_out.logits[1]) > 1e-4


def _set_slot(x, j, source):
  x = np.array(x)
  x[:, j] = np.asarray(source)[:, j]
  return x


def test_prompt_index_gather(forward, batch):
  """(e) Slots reading the same prompt with the same text agree; another prompt differs; and
  reordering the K prompts (with the indices remapped) changes nothing."""
  def same(x):  # slot 0's text in every slot
    return np.repeat(np.asarray(x)[:, :1], N, axis=1)

  boxes = np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.3, 0.9, 0.95]], np.float32)
  b = batch.replace(
      prompt_boxes=np.broadcast_to(boxes, (B, K, 4)).copy(),
      prompt_index=np.broadcast_to(np.array([0, 0, 1], np.int32), (B, N)).copy(),
      context_tokens=same(batch.context_tokens),
      decoder_input_tokens=same(batch.decoder_input_tokens))
  out = forward(b)
  _assert_close(out.logits[:, 1], out.logits[:, 0], 1e-6, "logits, same prompt")
  _assert_close(out.points[:, 1], out.points[:, 0], 1e-6, "points, same prompt")
  assert _max_diff(out.logits[:, 2], out.logits[:, 0]) > 1e-3
  assert _max_diff(out.points[:, 2], out.points[:, 0]) > 1e-4

  swapped = b.replace(prompt_boxes=b.prompt_boxes[:, ::-1].copy(),
                      prompt_index=(1 - b.prompt_index).astype(np.int32))
  out_swapped = forward(swapped)
  _assert_close(out_swapped.logits, out.logits, 1e-5, "logits, prompts reordered")
  _assert_close(out_swapped.points, out.points, 1e-5, "points, prompts reordered")


def _decode(model):
  return jax.jit(lambda v, enc, tok: model.apply(v, enc, tok, method=PixelLLM.decode))


def test_cached_decoding_matches_teacher_forced(model, variables, batch):
  """(f) Greedy decoding with the KV cache, then the same tokens through (1) the cache one step at
  a time and (2) one teacher-forced pass: logits and points agree; the greedy tokens are the
  argmax of the teacher-forced logits (up to the first EOS); the adapter's points are the
  teacher-forced ones."""
  enc = jax.jit(lambda v, b: model.apply(v, **mf.encode_inputs(b), method=PixelLLM.encode))(
      variables, batch)
  greedy = jax.jit(decoding.greedy_decode_pixel_llm, static_argnums=(0, 3))(
      model, variables, enc, L)
  tokens = np.asarray(greedy.tokens)
  assert tokens.shape == (B, N, L)
  inputs = np.concatenate([np.zeros((B, N, 1), np.int32), tokens[..., :-1]], axis=-1)

  full = _decode(model)(variables, enc, jnp.asarray(inputs))

  @jax.jit
  def init_cache(v, enc):
    _, vars_ = model.apply(v, enc, jnp.zeros((B, N, L), jnp.int32), decode=True,
                           mutable=["cache"], method=PixelLLM.decode)
    return vars_["cache"]

  @jax.jit
  def step(v, cache, enc, tok_BxNx1):
    out, vars_ = model.apply({**v, "cache": cache}, enc, tok_BxNx1, decode=True,
                             mutable=["cache"], method=PixelLLM.decode)
    return out, vars_["cache"]

  cache = init_cache(variables, enc)
  for t in range(L):
    out, cache = step(variables, cache, enc, jnp.asarray(inputs[..., t:t + 1]))
    _assert_close(out.logits[..., 0, :], full.logits[..., t, :], 1e-5, f"logits at {t}")
    _assert_close(out.points[..., 0, :, :], full.points[..., t, :, :], 1e-5, f"points at {t}")

  argmax = np.asarray(jnp.argmax(full.logits, axis=-1))
  for idx in np.ndindex(B, N):
    eos = np.flatnonzero(tokens[idx] == decoding.EOS_ID)
    end = eos[0] + 1 if eos.size else L
    np.testing.assert_array_equal(tokens[idx][:end], argmax[idx][:end])
    np.testing.assert_array_equal(tokens[idx][end:], 0)
  # Decoded.points[t] localizes tokens[t]: the head at decoder input position t + 1.
  _assert_close(greedy.points[..., :L - 1, :, :], full.points[..., 1:, :, :], 1e-5)


@pytest.mark.parametrize("loc_grad_to_lm", [False, True])
def test_loc_grad_to_lm(variables, batch, loc_grad_to_lm):
  """(g) The point loss reaches the T5 params only when loc_grad_to_lm is True."""
  model = PixelLLM(mf.toy_config(lora_rank=LORA_RANK, loc_grad_to_lm=loc_grad_to_lm))

  @jax.jit
  def point_loss_grads(params, b):
    def point_loss(p):
      _, metrics = losses.compute_losses(model.apply({"params": p}, **mf.inputs(b)), b)
      return metrics["point_loss"]
    return jax.grad(point_loss)(params)

  grads = point_loss_grads(variables["params"], batch)
  t5_norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["t5"])]
  head_norm = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["loc_head"]))
  assert head_norm > 0
  if loc_grad_to_lm:
    assert max(t5_norms) > 0
    extractor = traverse_util.flatten_dict(grads["extractor"], sep="/")
    key_bias = {k: v for k, v in extractor.items() if k.endswith("k_proj/bias")}
    others = max(float(jnp.abs(v).max()) for k, v in extractor.items() if k not in key_bias)
    assert others > 0
    # Attention key biases shift every score of a query equally, which softmax ignores: their
    # gradient is zero up to rounding (test_sharded_train relies on this).
    assert key_bias and max(float(jnp.abs(v).max()) for v in key_bias.values()) < 1e-6 * others
  else:
    assert max(t5_norms) == 0.0
    # Everything upstream of the LM is cut off from the point loss too.
    for tower in ("eva02", "extractor", "visual_proj"):
      assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[tower])) == 0.0, tower


def test_fresh_lora_equals_rank_zero_model(variables, batch, base_out):
  """(h) With lora_b at its zero init, the LoRA model is the rank-0 model on the base params."""
  params = variables["params"]
  lora_b = [x for kp, x in jax.tree_util.tree_leaves_with_path(params)
            if str(getattr(kp[-1], "key", "")) == "lora_b"]
  assert lora_b and all(float(jnp.abs(x).max()) == 0.0 for x in lora_b)

  def strip(tree):
    if not isinstance(tree, dict):
      return tree
    return {k: strip(v) for k, v in tree.items() if k not in LORA_PARAM_NAMES}

  base_model = PixelLLM(mf.toy_config(lora_rank=0))
  out = jax.jit(lambda p, b: base_model.apply({"params": p}, **mf.inputs(b)))(
      strip(dict(params)), batch)
  _assert_close(out.logits, base_out.logits, 1e-6, "logits")
  _assert_close(out.points, base_out.points, 1e-6, "points")


# --------------------------------------------------------------------------------------- losses


def _loss_batch(targets, text_w, point_targets, point_w) -> Batch:
  b, n, l = targets.shape
  return Batch(
      image=np.zeros((b, 1, 1, 3), np.uint8), image_valid_hw=np.ones((b, 2), np.float32),
      prompt_boxes=np.zeros((b, 1, 4), np.float32), prompt_index=np.zeros((b, n), np.int32),
      context_tokens=np.zeros((b, n, 1), np.int32), decoder_input_tokens=np.zeros_like(targets),
      decoder_target_tokens=targets, decoder_loss_weights=text_w,
      point_targets=point_targets, point_weights=point_w,
      task_ids=np.zeros((b, n), np.int32))


def test_label_smoothing_on_hand_computed_example():
  # V = 4; softmax(log [1, 2, 3, 4]) = [.1, .2, .3, .4]. Three tokens, the last one unweighted.
  logits = np.log(np.array([[1.0, 2.0, 3.0, 4.0]] * 3, np.float32))[None, None]  # [1, 1, 3, 4]
  targets = np.array([[[3, 0, 2]]], np.int32)
  text_w = np.array([[[1.0, 1.0, 0.0]]], np.float32)
  points = np.zeros((1, 1, 3, 1, 2), np.float32)
  batch = _loss_batch(targets, text_w, points, np.zeros((1, 1, 3), np.float32))
  out = Output(logits=jnp.asarray(logits), points=jnp.asarray(points),
               hidden=jnp.zeros((1, 1, 3, 1)))
  cfg = losses.LossConfig(label_smoothing=0.1, point_loss_weight=1.0)
  total, metrics = losses.compute_losses(out, batch, cfg)
  # Token 0 (target 3): -(0.9 log .4 + 0.1/3 (log .1 + log .2 + log .3)) = 0.99519485...
  # Token 1 (target 0): -(0.9 log .1 + 0.1/3 (log .2 + log .3 + log .4)) = 2.19664997...
  tok0 = -(0.9 * np.log(0.4) + 0.1 / 3 * (np.log(0.1) + np.log(0.2) + np.log(0.3)))
  tok1 = -(0.9 * np.log(0.1) + 0.1 / 3 * (np.log(0.2) + np.log(0.3) + np.log(0.4)))
  np.testing.assert_allclose(tok0, 0.99519485, atol=1e-7)
  np.testing.assert_allclose(tok1, 2.19664997, atol=1e-7)
  np.testing.assert_allclose(metrics["text_loss"], (tok0 + tok1) / 2, rtol=1e-6)
  np.testing.assert_allclose(total, (tok0 + tok1) / 2, rtol=1e-6)  # no point tokens
  assert float(metrics["point_loss"]) == 0.0
  np.testing.assert_allclose(metrics["token_accuracy"], 0.5)  # argmax 3: token 0 right, 1 wrong
  np.testing.assert_allclose(metrics["count/text_loss"], 2.0)
  np.testing.assert_allclose(metrics["count/token_accuracy"], 2.0)
  cfg0 = losses.LossConfig(label_smoothing=0.0)
  _, m0 = losses.compute_losses(out, batch, cfg0)
  np.testing.assert_allclose(m0["text_loss"], -(np.log(0.4) + np.log(0.1)) / 2, rtol=1e-6)


def test_token_accuracy_counts_weighted_tokens_only():
  logits = np.log(np.array([[1.0, 2.0, 3.0, 4.0]] * 3, np.float32))[None, None]
  targets = np.array([[[3, 3, 0]]], np.int32)
  batch = _loss_batch(targets, np.array([[[1.0, 0.0, 1.0]]], np.float32),
                      np.zeros((1, 1, 3, 1, 2), np.float32), np.zeros((1, 1, 3), np.float32))
  out = Output(logits=jnp.asarray(logits), points=jnp.zeros((1, 1, 3, 1, 2)),
               hidden=jnp.zeros((1, 1, 3, 1)))
  _, metrics = losses.compute_losses(out, batch)
  np.testing.assert_allclose(metrics["token_accuracy"], 0.5)


def test_point_l1_only_over_point_weighted_tokens():
  targets = np.array([[[5, 6, 1]]], np.int32)
  pred = np.array([[[[[0.1, 0.2], [0.3, 0.4]],
                     [[0.5, 0.5], [0.5, 0.5]],
                     [[0.9, 0.9], [0.9, 0.9]]]]], np.float32)          # [1, 1, 3, 2, 2]
  tgt = np.array([[[[[0.2, 0.2], [0.3, 0.0]],                        # |d| mean = 0.125
                    [[100.0, -100.0], [100.0, 100.0]],                # huge error, weight 0
                    [[0.9, 0.5], [0.9, 0.9]]]]], np.float32)          # |d| mean = 0.1
  point_w = np.array([[[1.0, 0.0, 1.0]]], np.float32)
  batch = _loss_batch(targets, np.zeros((1, 1, 3), np.float32), tgt, point_w)
  out = Output(logits=jnp.zeros((1, 1, 3, 8)), points=jnp.asarray(pred),
               hidden=jnp.zeros((1, 1, 3, 1)))
  cfg = losses.LossConfig(label_smoothing=0.1, point_loss_weight=2.0)
  total, metrics = losses.compute_losses(out, batch, cfg)
  np.testing.assert_allclose(metrics["point_loss"], (0.125 + 0.1) / 2, rtol=1e-5)
  np.testing.assert_allclose(total, 2.0 * (0.125 + 0.1) / 2, rtol=1e-5)  # no text tokens
  assert float(metrics["text_loss"]) == 0.0
  np.testing.assert_allclose(metrics["count/point_loss"], 2.0)
  np.testing.assert_allclose(metrics["count/text_loss"], 0.0)


def test_zero_weights_give_zero_loss_and_finite_grads():
  targets = np.array([[[5, 6, 1]]], np.int32)
  zeros = np.zeros((1, 1, 3), np.float32)
  batch = _loss_batch(targets, zeros, np.zeros((1, 1, 3, 2, 2), np.float32), zeros)
  logits = jnp.asarray(np.random.RandomState(0).randn(1, 1, 3, 8).astype(np.float32))
  points = jnp.full((1, 1, 3, 2, 2), 0.5)

  def loss(logits, points):
    out = Output(logits=logits, points=points, hidden=jnp.zeros((1, 1, 3, 1)))
    return losses.compute_losses(out, batch)

  (total, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(logits, points)
  for name in ("loss", "text_loss", "point_loss", "token_accuracy"):
    assert float(metrics[name]) == 0.0, name
  assert float(total) == 0.0
  for g in grads:
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) == 0.0


def test_box_grid_points_span_the_box():
  from pixelllm_jax.models.pixel_llm import box_grid_points
  box = jnp.array([[0.2, 0.4, 0.6, 1.0]])
  np.testing.assert_allclose(box_grid_points(box, 2)[0],
                             [[0.2, 0.4], [0.6, 0.4], [0.2, 1.0], [0.6, 1.0]], atol=1e-6)
  grid = np.asarray(box_grid_points(box, 3)[0])
  assert grid.shape == (9, 2)
  np.testing.assert_allclose(grid[4], [0.4, 0.7], atol=1e-6)  # the centre
  with pytest.raises(ValueError, match="prompt_points_per_side"):
    dataclasses.replace(mf.toy_config(), prompt_points_per_side=1)


def test_grid_point_prompt_encodes_the_box(variables, batch):
  """prompt_points_per_side = 3: same parameters; visual tokens follow the box and the
  points are embedded as positive point prompts (not as the box-corner tokens)."""
  model = PixelLLM(dataclasses.replace(mf.toy_config(lora_rank=LORA_RANK),
                                       prompt_points_per_side=3))
  tokens = jax.jit(lambda v, b: model.apply(v, b.image, b.image_valid_hw, b.prompt_boxes,
                                            method=_visual_tokens))
  corner_tokens = PixelLLM(mf.toy_config(lora_rank=LORA_RANK)).apply(
      variables, batch.image, batch.image_valid_hw, batch.prompt_boxes, method=_visual_tokens)
  base = tokens(variables, batch)
  assert base.shape == corner_tokens.shape
  assert _max_diff(base, corner_tokens) > 1e-3
  boxes = np.array(batch.prompt_boxes)
  boxes[0, 0] = [0.1, 0.1, 0.3, 0.3]
  moved = batch.replace(prompt_boxes=boxes)
  out = tokens(variables, moved)
  assert _max_diff(out[0, 0], base[0, 0]) > 1e-3      # the moved prompt changes
  _assert_close(out[0, 1], base[0, 1], 1e-6)          # the other prompts do not
  _assert_close(out[1], base[1], 1e-6)


def _visual_tokens(module, image, image_valid_hw, prompt_boxes):
  return module.visual_tokens(module.image_features(image).fused, image_valid_hw, prompt_boxes)


def test_giou_loss_on_hand_computed_boxes():
  true = np.array([[0.1, 0.1], [0.5, 0.5]], np.float32)          # box 0.4 x 0.4
  # Same box, corners given in either order: GIoU 1, loss 0.
  np.testing.assert_allclose(losses.giou_loss(true, true), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.giou_loss(true[::-1], true), 0.0, atol=1e-6)
  # Half overlap: [0.3, 0.1, 0.7, 0.5]; inter .08, union .24, hull .6 x .4 = .24: IoU 1/3.
  shifted = np.array([[0.3, 0.1], [0.7, 0.5]], np.float32)
  np.testing.assert_allclose(losses.giou_loss(shifted, true), 1.0 - 1.0 / 3.0, rtol=1e-5)
  # Disjoint [0.6, 0.6, 0.9, 0.9]: IoU 0, union .25, hull .64: GIoU -.39/.64.
  far = np.array([[0.6, 0.6], [0.9, 0.9]], np.float32)
  np.testing.assert_allclose(losses.giou_loss(far, true), 1.0 + 0.39 / 0.64, rtol=1e-5)


def test_box_giou_weight_adds_the_mean_over_point_weighted_tokens_of_its_tasks():
  # Two slots: a referring one and a trace one; box_giou_tasks picks which count.
  targets = np.array([[[5, 6, 1], [5, 6, 1]]], np.int32)
  true = np.array([[0.1, 0.1], [0.5, 0.5]], np.float32)
  half = np.array([[0.3, 0.1], [0.7, 0.5]], np.float32)             # loss 2/3
  far = np.array([[0.9, 0.9], [0.95, 0.95]], np.float32)
  pred = np.stack([np.stack([half, far, true]),                      # refer: weights 1, 0, 1
                   np.stack([far, far, far])])[None]                 # trace: weights 1, 1, 1
  tgt = np.broadcast_to(true, (1, 2, 3, 2, 2)).copy()
  point_w = np.array([[[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]], np.float32)
  batch = _loss_batch(targets, np.zeros((1, 2, 3), np.float32), tgt, point_w)
  batch = batch.replace(task_ids=np.array([[TASKS.index("refer"), TASKS.index("trace")]], np.int32))
  out = Output(logits=jnp.zeros((1, 2, 3, 8)), points=jnp.asarray(pred),
               hidden=jnp.zeros((1, 2, 3, 1)))
  plain_cfg = losses.LossConfig(point_loss_weight=1.0, per_task_mean=False)
  plain, m0 = losses.compute_losses(out, batch, plain_cfg)
  assert "giou_loss" not in m0
  cfg = dataclasses.replace(plain_cfg, box_giou_weight=3.0, box_giou_tasks=("refer",))
  total, m = losses.compute_losses(out, batch, cfg)
  np.testing.assert_allclose(m["giou_loss"], (2.0 / 3.0 + 0.0) / 2, rtol=1e-5)
  np.testing.assert_allclose(m["count/giou_loss"], 2.0)
  np.testing.assert_allclose(total, plain + 3.0 * (1.0 / 3.0), rtol=1e-5)
  # The default counts trace too: its three weighted tokens, each a disjoint box (far_loss).
  assert losses.LossConfig().box_giou_tasks == ("trace", "refer", "refseg")
  both = losses.compute_losses(out, batch, dataclasses.replace(cfg, box_giou_tasks=("trace", "refer")))[1]
  far_loss = float(losses.giou_loss(far, true))
  np.testing.assert_allclose(both["giou_loss"], (2.0 / 3.0 + 3 * far_loss) / 5, rtol=1e-5)
  one_point = Output(logits=out.logits, points=out.points[..., :1, :], hidden=out.hidden)
  with pytest.raises(ValueError, match="2 points per token"):
    losses.compute_losses(one_point, batch, losses.LossConfig(box_giou_weight=1.0))
  with pytest.raises(ValueError, match="unknown tasks"):
    losses.LossConfig(box_giou_tasks=("boxes",))
