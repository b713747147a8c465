"""Tests for models/two_way.py: parity with a NumPy SAM reference and equivariance."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax.models.two_way import TwoWayTransformer
from axis_names import assert_known_axis_names

B, S, T, C = 2, 12, 5, 32
HEADS, MLP = 4, 48


def _module(**kw) -> TwoWayTransformer:
  return TwoWayTransformer(depth=2, embedding_dim=C, num_heads=HEADS, mlp_dim=MLP, **kw)


def _inputs(seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (B, S, C)), jax.random.normal(ks[1], (B, S, C)),
          jax.random.normal(ks[2], (B, T, C)))


@pytest.fixture(scope="module")
def setup():
  image, pe, tokens = _inputs()
  model = _module()
  variables = model.init(jax.random.key(1), image, pe, tokens)
  return model, variables, (image, pe, tokens)


# ---- NumPy reference written from SAM's modeling/transformer.py description ----

def _np_dense(p, x):
  return x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def _np_ln(p, x, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _np_attn(p, q, k, v, heads):
  q, k, v = _np_dense(p["q_proj"], q), _np_dense(p["k_proj"], k), _np_dense(p["v_proj"], v)

  def split(x):  # [B, N, I] -> [B, H, N, I/H]
    b, n, i = x.shape
    return x.reshape(b, n, heads, i // heads).transpose(0, 2, 1, 3)

  q, k, v = split(q), split(k), split(v)
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  out = (w @ v).transpose(0, 2, 1, 3)
  return _np_dense(p["out_proj"], out.reshape(*out.shape[:2], -1))


def _np_two_way(params, image, pe, tokens, depth, heads, eps):
  queries, keys = tokens, image
  for i in range(depth):
    p = params[f"layers_{i}"]
    if i == 0:
      queries = _np_attn(p["self_attn"], queries, queries, queries, heads)
    else:
      q = queries + tokens
      queries = queries + _np_attn(p["self_attn"], q, q, queries, heads)
    queries = _np_ln(p["norm1"], queries, eps)
    queries = queries + _np_attn(
        p["cross_attn_token_to_image"], queries + tokens, keys + pe, keys, heads)
    queries = _np_ln(p["norm2"], queries, eps)
    hidden = np.maximum(_np_dense(p["mlp"]["lin1"], queries), 0.0)
    queries = _np_ln(p["norm3"], queries + _np_dense(p["mlp"]["lin2"], hidden), eps)
    keys = keys + _np_attn(
        p["cross_attn_image_to_token"], keys + pe, queries + tokens, queries, heads)
    keys = _np_ln(p["norm4"], keys, eps)
  queries = queries + _np_attn(
      params["final_attn_token_to_image"], queries + tokens, keys + pe, keys, heads)
  return _np_ln(params["norm_final_attn"], queries, eps), keys


def _perturbed(variables, seed=7):
  """Random biases / LN params so the parity test exercises every parameter."""
  params = nn.unbox(variables)["params"]
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return {"params": jax.tree_util.tree_unflatten(treedef, leaves)}


@pytest.mark.parametrize("eps", [1e-5, 0.5])  # 0.5: the field really reaches every LN
def test_matches_numpy_reference(setup, eps):
  _, variables, (image, pe, tokens) = setup
  model = _module(layer_norm_eps=eps)
  variables = _perturbed(variables)
  queries, keys = model.apply(variables, image, pe, tokens)
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), variables["params"])
  ref_q, ref_k = _np_two_way(
      params, *(np.asarray(x, np.float64) for x in (image, pe, tokens)), 2, HEADS, eps)
  assert queries.shape == (B, T, C) and keys.shape == (B, S, C)
  np.testing.assert_allclose(queries, ref_q, atol=2e-5, rtol=0)
  np.testing.assert_allclose(keys, ref_k, atol=2e-5, rtol=0)


def test_cross_attention_internal_width(setup):
  """Self-attention runs at width C, cross-attention at C // downsample_rate (2)."""
  _, variables, _ = setup
  p = nn.unbox(variables)["params"]
  assert p["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (C, C)
  assert p["layers_0"]["cross_attn_token_to_image"]["q_proj"]["kernel"].shape == (C, C // 2)
  assert p["final_attn_token_to_image"]["out_proj"]["kernel"].shape == (C // 2, C)


def test_image_permutation_equivariance(setup):
  model, variables, (image, pe, tokens) = setup
  perm = np.random.default_rng(0).permutation(S)
  q0, k0 = model.apply(variables, image, pe, tokens)
  q1, k1 = model.apply(variables, image[:, perm], pe[:, perm], tokens)
  np.testing.assert_allclose(q1, q0, atol=1e-5, rtol=0)
  np.testing.assert_allclose(k1, k0[:, perm], atol=1e-5, rtol=0)


def test_pe_changes_output(setup):
  model, variables, (image, pe, tokens) = setup
  q0, k0 = model.apply(variables, image, pe, tokens)
  q1, k1 = model.apply(variables, image, pe * 0.0, tokens)
  assert float(jnp.max(jnp.abs(q1 - q0))) > 1e-2
  assert float(jnp.max(jnp.abs(k1 - k0))) > 1e-2


def test_bfloat16_activations(setup):
  _, variables, (image, pe, tokens) = setup
  q32, _ = _module().apply(variables, image, pe, tokens)
  q16, k16 = _module(dtype=jnp.bfloat16).apply(variables, image, pe, tokens)
  assert q16.dtype == jnp.bfloat16 and k16.dtype == jnp.bfloat16
  np.testing.assert_allclose(q16.astype(jnp.float32), q32, atol=0.15, rtol=0)


def test_params_have_known_logical_axes(setup):
  _, variables, _ = setup
  assert_known_axis_names(variables["params"])
