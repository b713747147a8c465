"""Layer-wise learning-rate decay (optim.scale_by_layer_decay, make_optimizer.layer_decay).

The trees come from the real towers (abstract init of a small EVA02 and SAM ViT, filled with
random numbers), so the layer ids are checked against the parameter names the models write.
"""
import dataclasses
import functools
import re

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pixelllm_jax import configurables, scan_layout
from pixelllm_jax.models import eva02, sam_vit, t5
from pixelllm_jax.train import optim

DECAY = 0.8
EVA_DEPTH = 3
# decay ** (depth + 1 - layer id) for each top-level EVA02 key: stem id 0, block i id i + 1,
# the rest (final norm, CLS token: not in the official stem list) id depth + 1.
EVA_EXPONENTS = {"patch_embed": 4, "pos_embed": 4, "blocks_0": 3, "blocks_1": 2, "blocks_2": 1,
                 "cls_token": 0, "norm": 0}


def _eva_cfg(scan=False):
  return eva02.EVA02Config(image_size=32, patch_size=8, width=16, depth=EVA_DEPTH, num_heads=2,
                           mlp_dim=24, pretrain_grid=4, scan=scan)


SAM_DEPTH = 4


def _sam_cfg(scan=False):  # global blocks 1 and 3 of 4: scanned in 2 periods of 2 blocks
  return sam_vit.SamViTConfig(image_size=32, patch_size=8, width=16, depth=SAM_DEPTH,
                              num_heads=2, mlp_dim=16, window_size=2, global_blocks=(1, 3),
                              out_channels=8,
                              pretrain_grid=4, scan=scan)


@functools.cache
def _abstract_towers(scan):
  return (_abstract(eva02.EVA02ViT(_eva_cfg(scan)), _image()),
          _abstract(sam_vit.SamViT(_sam_cfg(scan)), _image()))


def _abstract(module, *args):
  return nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]


def _image():
  return jnp.zeros((1, 32, 32, 3), jnp.uint8)


def _random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, jnp.float32)
                            for k, x in zip(keys, leaves)])


def _model_tree(seed, *, scan=False):
  """{'eva02': EVA02 params, 'sam': SAM ViT params, 'loc_head': a head} with random values
  (the same values per layer in both layouts)."""
  eva, sam = _abstract_towers(False)
  abstract = {"eva02": eva, "sam": sam,
              "loc_head": {"dense": {"kernel": jax.ShapeDtypeStruct((4, 2), jnp.float32),
                                     "bias": jax.ShapeDtypeStruct((2,), jnp.float32)}}}
  tree = _random_like(abstract, seed)
  if not scan:
    return tree
  eva, sam = _abstract_towers(True)
  like = {**tree, "eva02": eva, "sam": sam}
  return scan_layout.convert(tree, like)


def _one_step(tx, params, grads):
  return tx.update(grads, tx.init(params), params)[0]


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def test_sgd_updates_scale_by_decay_power_per_layer():
  params, grads = _model_tree(0), _model_tree(1)
  assert set(params["eva02"]) == set(EVA_EXPONENTS)  # a new EVA02 parameter needs an id here
  plain = _one_step(optax.sgd(0.1), params, grads)
  decayed = _one_step(optax.chain(optax.sgd(0.1), optim.scale_by_layer_decay(DECAY, "eva02")),
                      params, grads)
  for key, exponent in EVA_EXPONENTS.items():
    scale = np.float32(DECAY ** exponent)
    for path, u in jax.tree_util.tree_leaves_with_path(plain["eva02"][key]):
      np.testing.assert_array_equal(np.asarray(_at(decayed["eva02"][key], path)),
                                    np.asarray(u) * scale,
                                    err_msg=f"eva02/{key}{jax.tree_util.keystr(path)}")
  # the other towers, a SAM 'pos_embed' and 'blocks_i' included, are untouched
  _assert_trees_equal(decayed["sam"], plain["sam"])
  _assert_trees_equal(decayed["loc_head"], plain["loc_head"])


def _at(tree, key_path):
  for k in key_path:
    tree = tree[k.key]
  return tree


def _adamw(**kw):
  # no warmup: the first step's learning rate is not 0
  return optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10,
                              weight_decay=0.1, **kw)


def _trainable(path):
  return path[0] != "sam"  # SAM frozen, as in the official densecap configs


def test_adamw_with_frozen_and_clipping_scales_one_step_exactly():
  """Order clip -> AdamW (weight decay included) -> layer scale, under with_frozen: the first
  update of an EVA02 leaf is the undecayed one times its scale; frozen leaves stay zero."""
  params, grads = _model_tree(0), _model_tree(1)
  plain = _one_step(optim.with_frozen(_adamw(grad_clip_norm=1.0), _trainable), params, grads)
  decayed = _one_step(optim.with_frozen(_adamw(grad_clip_norm=1.0, layer_decay=DECAY),
                                        _trainable), params, grads)
  for key, exponent in EVA_EXPONENTS.items():
    scale = np.float32(DECAY ** exponent)
    for path, u in jax.tree_util.tree_leaves_with_path(plain["eva02"][key]):
      assert np.any(np.asarray(u) != 0)
      np.testing.assert_array_equal(np.asarray(_at(decayed["eva02"][key], path)),
                                    np.asarray(u) * scale)
  _assert_trees_equal(decayed["loc_head"], plain["loc_head"])
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(decayed["sam"]))


@pytest.mark.parametrize("tower", ["eva02", "sam"])
def test_scanned_layout_gives_the_per_layer_updates(tower):
  """Two AdamW steps with weight decay: the scanned tree's updates, converted back, equal the
  per-layer ones (EVA02: one layer axis; SAM: periods of 2, layer g * 2 + j)."""
  tx = optim.with_frozen(_adamw(layer_decay=DECAY, layer_decay_tower=tower), lambda p: True)
  per_layer = _model_tree(0)
  scanned = _model_tree(0, scan=True)
  assert "blocks" in scanned[tower] and "blocks_0" not in scanned[tower]
  results = {}
  for name, params in (("per_layer", per_layer), ("scanned", scanned)):
    state = tx.init(params)
    for step in range(2):
      grads = scan_layout.convert(_model_tree(10 + step), params)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    results[name] = updates
  _assert_trees_equal(scan_layout.convert(results["scanned"], per_layer), results["per_layer"])
  # and the decay did act: the first block's update differs from an undecayed run's
  undecayed = optim.with_frozen(_adamw(), lambda p: True)
  u0 = _one_step(undecayed, per_layer, _model_tree(10))[tower]["blocks_0"]
  d0 = _one_step(tx, per_layer, _model_tree(10))[tower]["blocks_0"]
  depth = SAM_DEPTH if tower == "sam" else EVA_DEPTH
  for a, b in zip(jax.tree.leaves(d0), jax.tree.leaves(u0)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b) * np.float32(DECAY ** depth))


def test_decay_one_equals_no_option():
  params = _model_tree(0)
  runs = []
  for kw in ({}, {"layer_decay": 1.0}):
    tx = optim.with_frozen(_adamw(grad_clip_norm=1.0, **kw), _trainable)
    p, state = params, tx.init(params)
    for step in range(3):
      updates, state = tx.update(_model_tree(10 + step), state, p)
      p = optax.apply_updates(p, updates)
    runs.append(p)
  _assert_trees_equal(runs[1], runs[0])


def test_layer_ids_of_a_scanned_periodic_stack():
  depth, ids = optim.tower_layer_ids(_model_tree(0, scan=True)["sam"])
  assert depth == SAM_DEPTH
  for path, layer_id in ids.items():
    if path[0] == "blocks":  # blocks/blocks_j[g] is layer g * 2 + j, id + 1
      j = int(path[1].split("_")[1])
      np.testing.assert_array_equal(layer_id, [j + 1, 2 + j + 1])
    else:
      assert layer_id == (0 if path[0] in ("patch_embed", "pos_embed") else 5), path


def _stack_free(path):
  return tuple(re.sub(r"^(layers|blocks)_\d+$", r"\1", k) for k in path)


def _masks_by_layer_free_path(params):
  mask = optim._decay_mask(params)
  out = {}
  for kp, decayed in jax.tree_util.tree_leaves_with_path(mask):
    out.setdefault(_stack_free(tuple(k.key for k in kp)), set()).add(decayed)
  return out


@pytest.mark.parametrize("tower", ["eva02", "t5"])
def test_weight_decay_mask_ignores_the_layer_axis(tower):
  """A scanned stack decays the same leaves as the unrolled one (a bias is [depth, D] when
  scanned, still not decayed)."""
  if tower == "eva02":
    module = lambda scan: eva02.EVA02ViT(_eva_cfg(scan))
    args = (_image(),)
  else:
    cfg = t5.T5Config(vocab_size=50, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                      num_encoder_layers=2, num_decoder_layers=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    module = lambda scan: t5.T5(dataclasses.replace(cfg, scan=scan))
    args = (jnp.zeros((1, 3, 16)), jnp.ones((1, 3), bool), jnp.zeros((1, 2), jnp.int32))
  unrolled = _masks_by_layer_free_path(_abstract(module(False), *args))
  scanned = _masks_by_layer_free_path(_abstract(module(True), *args))
  assert unrolled == scanned
  assert {False} in unrolled.values() and {True} in unrolled.values()


def test_gin_binds_the_decay_and_the_tower():
  gin.clear_config()
  try:
    gin.parse_config("\n".join([
        "make_optimizer.learning_rate = 1e-2", "make_optimizer.warmup_steps = 0",
        "make_optimizer.total_steps = 10", "make_optimizer.weight_decay = 0.1",
        "make_optimizer.layer_decay = 0.8", "make_optimizer.layer_decay_tower = 'sam'"]))
    built = configurables.REGISTERED["make_optimizer"][1]()
  finally:
    gin.clear_config()
  params, grads = _model_tree(0), _model_tree(1)
  expected = _one_step(_adamw(layer_decay=0.8, layer_decay_tower="sam"), params, grads)
  undecayed = _one_step(_adamw(), params, grads)
  got = _one_step(built, params, grads)
  _assert_trees_equal(got, expected)
  _assert_trees_equal(got["eva02"], undecayed["eva02"])
  assert not np.array_equal(got["sam"]["blocks_0"]["lin1"]["kernel"],
                            undecayed["sam"]["blocks_0"]["lin1"]["kernel"])


def test_misconfiguration_fails_loudly():
  params = _model_tree(0)
  with pytest.raises(ValueError, match="no 'vit'"):
    _one_step(_adamw(layer_decay=DECAY, layer_decay_tower="vit"), params, params)
  with pytest.raises(ValueError, match="> 0"):
    optim.scale_by_layer_decay(0.0, "eva02")


# ---- learning-rate multipliers per submodule (optim.scale_by_submodule) ----------------------


def test_submodule_multiplier_scales_that_submodules_adamw_update_only():
  # The official refseg configs: 10x learning rate on the mask adapter. With the frozen split
  # (the mask decoder frozen) and weight decay on, the adapter's first AdamW update is exactly
  # 10x the plain one, every other trainable leaf's is unchanged and the frozen one stays 0.
  rng = np.random.default_rng(0)
  params = {"mask_adapter": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                             "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "loc_head": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
            "mask_decoder": {"kernel": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  trainable = lambda path: path[0] != "mask_decoder"  # noqa: E731

  def first_update(**options):
    tx = optim.with_frozen(optim.make_optimizer(learning_rate=1e-2, warmup_steps=0,
                                                total_steps=10, weight_decay=0.05, **options),
                           trainable)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates

  plain, boosted = first_update(), first_update(lr_multipliers={"mask_adapter": 10.0})
  assert np.abs(plain["mask_adapter"]["kernel"]).min() > 0
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(boosted["mask_adapter"][name], 10 * plain["mask_adapter"][name],
                               rtol=1e-6)
  np.testing.assert_array_equal(boosted["loc_head"]["kernel"], plain["loc_head"]["kernel"])
  np.testing.assert_array_equal(boosted["mask_decoder"]["kernel"], 0)


def test_submodule_multiplier_misconfiguration_fails_loudly():
  with pytest.raises(ValueError, match="must be > 0"):
    optim.scale_by_submodule({"mask_adapter": 0.0})
  tx = optim.scale_by_submodule({"mask_adaptor": 10.0})
  params = {"mask_adapter": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"\['mask_adaptor'\]"):
    tx.update(params, tx.init(params), params)
