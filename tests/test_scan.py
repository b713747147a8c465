"""Layer scan (layers.block_stack) and the layout conversion (scan_layout.py).

Scanned towers must compute what the unrolled ones compute from the same weights (outputs and
gradients), the two parameter layouts must convert both ways exactly, per-layer checkpoints
(what the importers write) must load into a scanned model, and decoding with the cache must
work through the scanned decoder.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_fixtures as mf
from pixelllm_jax import decoding, partitioning, scan_layout
from pixelllm_jax.model import PixelLLMModel
from pixelllm_jax.models import eva02, sam_vit, t5
from pixelllm_jax.models.pixel_llm import PixelLLM
from pixelllm_jax.train import checkpoint

# Scan sums the same float32 terms in the same order; what differs is XLA's fusion of a loop
# body against straight-line code, a few ulps.
TOL = 2e-5


def _init(module, *args):
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), *args))["params"]


def _abstract(module, *args):
  return nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]


def _assert_trees_close(a, b, tol=TOL):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for path, x in jax.tree_util.tree_leaves_with_path(a):
    y = b
    for k in path:
      y = y[k.key]
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol,
                               err_msg=jax.tree_util.keystr(path))


def _tower_case(name):
  image = jax.random.randint(jax.random.key(1), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
  if name == "eva02":
    cfg = eva02.EVA02Config(image_size=32, patch_size=8, width=32, depth=3, num_heads=2,
                            mlp_dim=48, pretrain_grid=4)
    return eva02.EVA02ViT, cfg, (image,)
  if name == "sam":  # global blocks 2 and 5 of 6: scanned in 2 periods of 3 blocks
    cfg = sam_vit.SamViTConfig(image_size=32, patch_size=4, width=32, depth=6, num_heads=2,
                               mlp_dim=32, window_size=3, global_blocks=(2, 5), out_channels=16,
                               pretrain_grid=8)
    return sam_vit.SamViT, cfg, (image,)
  cfg = t5.T5Config(vocab_size=50, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=3,
                    num_decoder_layers=2, relative_attention_num_buckets=8,
                    relative_attention_max_distance=16)
  embeds = jax.random.normal(jax.random.key(2), (2, 5, 16))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  tokens = jnp.array([[0, 3, 4, 5], [0, 7, 8, 9]])
  return t5.T5, cfg, (embeds, mask, tokens)


@pytest.mark.parametrize("tower,remat", [("eva02", "none"), ("sam", "block"), ("t5", "none"),
                                         ("t5", "dots_with_no_batch_dims_saveable")])
def test_scanned_tower_equals_unrolled(tower, remat):
  cls, cfg, args = _tower_case(tower)
  unrolled, scanned = cls(cfg), cls(dataclasses.replace(cfg, scan=True, remat=remat))
  params = _init(unrolled, *args)
  scanned_params = scan_layout.convert(params, _abstract(scanned, *args))
  assert scan_layout.convert(scanned_params, params).keys() == params.keys()

  def loss(module, p):
    out = module.apply({"params": p}, *args)
    out = out if isinstance(out, tuple) else (out,)
    return sum(jnp.sum(jnp.sin(o)) for o in out), out

  (_, out_u), grad_u = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True))(
      params)
  (_, out_s), grad_s = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True))(
      scanned_params)
  for a, b in zip(out_u, out_s):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=TOL)
  _assert_trees_close(scan_layout.convert(grad_u, scanned_params), grad_s)


def test_layouts_and_axis_names():
  _, cfg, args = _tower_case("sam")
  scanned = _abstract(sam_vit.SamViT(dataclasses.replace(cfg, scan=True)), *args)
  assert sorted(scanned["blocks"]) == ["blocks_0", "blocks_1", "blocks_2"]  # period 3
  assert scanned["blocks"]["blocks_2"]["attn"]["rel_pos_h"].shape[0] == 2    # 6 / 3 periods
  boxed = jax.eval_shape(sam_vit.SamViT(dataclasses.replace(cfg, scan=True)).init,
                         jax.random.key(0), *args)["params"]
  kernel = boxed["blocks"]["blocks_0"]["lin1"]["kernel"]
  assert kernel.names == ("layers", "embed", "mlp")
  _, cfg, args = _tower_case("t5")
  scanned = _abstract(t5.T5(dataclasses.replace(cfg, scan=True)), *args)
  assert scanned["encoder"]["layers"]["mlp"]["wo"]["kernel"].shape == (3, 32, 16)
  assert "layers_0" not in scanned["encoder"]


def test_round_trip_is_exact_and_bad_stacks_are_named():
  cls, cfg, args = _tower_case("sam")
  params = _init(cls(cfg), *args)
  like = _abstract(cls(dataclasses.replace(cfg, scan=True)), *args)
  back = scan_layout.convert(scan_layout.convert(params, like), params)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
  missing = dict(params)
  del missing["blocks_4"]
  with pytest.raises(ValueError, match="blocks"):
    scan_layout.convert(missing, like)


def test_cached_decode_equals_teacher_forced_with_the_scanned_decoder():
  _, cfg, (embeds, mask, tokens) = _tower_case("t5")
  model = t5.T5(dataclasses.replace(cfg, scan=True))
  params = _init(model, embeds, mask, tokens)
  variables = {"params": params}
  logits, _ = model.apply(variables, embeds, mask, tokens)
  encoded = model.apply(variables, embeds, mask, method=t5.T5.encode)
  _, cache = model.apply(variables, encoded, mask, jnp.zeros_like(tokens), decode=True,
                         mutable=["cache"], method=t5.T5.decode)
  # The cross-attention keys and values are projected once, in the cache, per layer.
  cross = cache["cache"]["decoder"]["layers"]["encoder_decoder_attention"]
  assert cross["cross_key"].shape == (2, 2, 5, 2, 8)  # [layers, B, S, H, K]
  step = jax.jit(lambda c, tok: model.apply({**variables, "cache": c}, encoded, mask, tok,
                                            decode=True, mutable=["cache"], method=t5.T5.decode))
  cache, steps = cache["cache"], []
  for t in range(tokens.shape[1]):
    (step_logits, _), new = step(cache, tokens[:, t:t + 1])
    cache = new["cache"]
    steps.append(step_logits[:, 0])
  np.testing.assert_allclose(np.stack(steps, 1), logits, atol=TOL, rtol=TOL)


def _scanned_config(cfg):
  return dataclasses.replace(
      cfg, t5=dataclasses.replace(cfg.t5, scan=True), eva02=dataclasses.replace(cfg.eva02, scan=True),
      sam=dataclasses.replace(cfg.sam, scan=True))


@pytest.fixture(scope="module")
def composers():
  batch = mf.random_batch(0)
  cfg = mf.toy_config(lora_rank=2)
  plain = PixelLLMModel(cfg, remat=partitioning.RematPolicy("block"))
  scanned = PixelLLMModel(_scanned_config(cfg), remat=partitioning.RematPolicy("block"))
  params = nn.meta.unbox(jax.jit(plain.init)(jax.random.key(0), batch))
  like = nn.meta.unbox(jax.eval_shape(scanned.init, jax.random.key(0), batch))
  return batch, plain, scanned, params, scan_layout.convert(params, like)


def test_scanned_composer_loss_and_greedy_decoding(composers):
  """(The towers' gradients are compared above; here the composer's wiring.)"""
  batch, plain, scanned, params, scanned_params = composers
  loss = lambda m, p: m.loss(p, batch, jax.random.key(3))[0]  # noqa: E731
  np.testing.assert_allclose(jax.jit(loss, static_argnums=0)(plain, params),
                             jax.jit(loss, static_argnums=0)(scanned, scanned_params),
                             atol=TOL, rtol=TOL)

  def greedy(model, p):
    encoded = model.module.apply({"params": p}, **mf.encode_inputs(batch), method=PixelLLM.encode)
    return decoding.greedy_decode_pixel_llm(model.module, {"params": p}, encoded, 6)
  a, b = jax.jit(greedy, static_argnums=0)(plain, params), jax.jit(
      greedy, static_argnums=0)(scanned, scanned_params)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.points, b.points, atol=TOL, rtol=TOL)


def test_per_layer_checkpoints_load_into_a_scanned_model(composers, tmp_path):
  """What the importers write (per layer, possibly a subset of towers) loads into a scanned
  model, on an 8-device mesh with FSDP, and a scanned checkpoint loads into an unrolled one."""
  batch, plain, scanned, params, scanned_params = composers
  checkpoint.save_params(str(tmp_path / "t5_only"), {"t5": params["t5"]})
  part = partitioning.Partitioner(mesh_shape=(2, 4, 1), rules="fsdp")
  boxed, shardings = part.abstract_params(lambda rng: scanned.init(rng, batch))
  fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nn.meta.unbox(boxed))
  loaded = checkpoint.load_params(str(tmp_path / "t5_only"), fresh, shardings)
  _assert_trees_close(loaded["t5"], scanned_params["t5"], tol=0)
  assert not np.any(np.asarray(loaded["eva02"]["blocks"]["norm1"]["scale"]))  # untouched
  wo = loaded["t5"]["encoder"]["layers"]["mlp"]["wo"]["kernel"]
  assert wo.sharding.spec == shardings["t5"]["encoder"]["layers"]["mlp"]["wo"]["kernel"].spec
  assert wo.sharding.shard_shape(wo.shape) != wo.shape  # really split over fsdp

  checkpoint.save_params(str(tmp_path / "scanned"), scanned_params)
  loaded = checkpoint.load_params(str(tmp_path / "scanned"), params,
                                  jax.tree.map(lambda x: x.sharding, params))
  _assert_trees_close(loaded, params, tol=0)
