"""LoraDense, LoraConfig validation, merge_lora and the trainable-path predicate."""
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax import lora, partitioning
from pixelllm_jax.train import optim

AXES = ("embed", "joined_kv")


def _init(module, x, seed=0):
  return module.init(jax.random.key(seed), x)


def test_config_validates_targets_at_construction():
  assert lora.LoraConfig(rank=8, encoder_self=["q", "k"]).encoder_self == ("q", "k")
  with pytest.raises(ValueError, match="unknown projections"):
    lora.LoraConfig(decoder_cross=("q", "x"))
  with pytest.raises(TypeError, match="string"):
    lora.LoraConfig(encoder_self="q,v")
  with pytest.raises(ValueError, match="rank"):
    lora.LoraConfig(rank=-1)
  cfg = lora.LoraConfig(rank=4, decoder_self=("v",))
  assert cfg.rank_for(cfg.decoder_self, "v") == 4
  assert cfg.rank_for(cfg.decoder_self, "q") == 0


def test_rank_zero_is_a_plain_projection():
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  module = lora.LoraDense(6, AXES, rank=0, use_bias=True)
  variables = _init(module, x)
  params = nn.meta.unbox(variables["params"])
  assert set(params) == {"kernel", "bias"}
  want = x @ params["kernel"] + params["bias"]
  np.testing.assert_allclose(module.apply(variables, x), want, atol=1e-6)


def test_adapter_starts_as_identity_and_adds_scaled_product():
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  module = lora.LoraDense(6, AXES, rank=2, scale=2.0)
  variables = _init(module, x)
  boxed = variables["params"]
  assert boxed["lora_a"].names == ("embed", "lora_rank")
  assert boxed["lora_b"].names == ("lora_rank", "joined_kv")
  assert boxed["kernel"].names == AXES
  params = nn.meta.unbox(boxed)
  assert params["lora_a"].shape == (8, 2) and params["lora_b"].shape == (2, 6)
  np.testing.assert_array_equal(params["lora_b"], 0.0)
  assert np.abs(params["lora_a"]).max() > 0
  np.testing.assert_array_equal(module.apply({"params": params}, x), x @ params["kernel"])

  params["lora_b"] = jax.random.normal(jax.random.key(2), (2, 6))
  want = x @ (params["kernel"] + 2.0 * params["lora_a"] @ params["lora_b"])
  np.testing.assert_allclose(module.apply({"params": params}, x), want, atol=1e-5)


class _Two(nn.Module):
  rank: int

  @nn.compact
  def __call__(self, x):
    h = lora.LoraDense(6, AXES, rank=self.rank, scale=3.0, name="a")(x)
    return lora.LoraDense(4, ("joined_kv", "embed"), rank=0, name="b")(h)


@pytest.mark.parametrize("boxed", [True, False])
def test_merge_lora_matches_unmerged_and_loads_into_rank_zero(boxed):
  x = jax.random.normal(jax.random.key(1), (2, 8))
  variables = _init(_Two(rank=3), x)
  b = jax.random.normal(jax.random.key(5), (3, 6))
  variables["params"]["a"]["lora_b"] = variables["params"]["a"]["lora_b"].replace_boxed(b)
  tree = variables if boxed else nn.meta.unbox(variables)
  merged = lora.merge_lora(tree, scale=3.0)

  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(merged))
  assert not any(lora.is_lora_path(k) for k in flat)
  if boxed:
    assert isinstance(merged["params"]["a"]["kernel"], nn.LogicallyPartitioned)
    assert merged["params"]["a"]["kernel"].names == AXES
  plain = _init(_Two(rank=0), x)
  assert jax.tree.structure(nn.meta.unbox(plain)) == jax.tree.structure(nn.meta.unbox(merged))
  np.testing.assert_allclose(
      _Two(rank=0).apply(merged, x), _Two(rank=3).apply(variables, x), atol=1e-5)
  # The untouched projection is passed through bit for bit.
  np.testing.assert_array_equal(
      nn.meta.unbox(merged)["params"]["b"]["kernel"],
      nn.meta.unbox(variables)["params"]["b"]["kernel"])


def test_merge_lora_rejects_half_an_adapter():
  with pytest.raises(ValueError, match="incomplete"):
    lora.merge_lora({"q": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 1))}})


def test_is_lora_path_and_mask_on_every_path_form():
  assert lora.is_lora_path("decoder/layers_0/self_attention/query/lora_a")
  assert lora.is_lora_path(("encoder", "attention", "value", "lora_b"))
  assert not lora.is_lora_path(("encoder", "attention", "value", "kernel"))
  x = jnp.ones((1, 8))
  variables = _init(_Two(rank=2), x)
  boxed_paths = jax.tree_util.tree_flatten_with_path(
      variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))[0]
  picked = sorted(jax.tree_util.keystr(p) for p, _ in boxed_paths if lora.is_lora_path(p))
  assert picked == ["['params']['a']['lora_a']", "['params']['a']['lora_b']"]
  labels = optim.trainable_labels(nn.meta.unbox(variables["params"]), lora.is_lora_path)
  assert labels == {"a": {"kernel": "freeze", "lora_a": "train", "lora_b": "train"},
                    "b": {"kernel": "freeze"}}


def test_lora_axis_names_are_known():
  assert "lora_rank" in partitioning.KNOWN_AXES
