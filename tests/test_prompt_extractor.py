"""Tests for models/prompt_extractor.py: wiring, per-prompt independence, sharding names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax import partitioning
from pixelllm_jax.models.prompt_extractor import PromptExtractor, PromptExtractorConfig
from pixelllm_jax.models.two_way import TwoWayTransformer
from axis_names import assert_known_axis_names

B, H, W, C = 2, 3, 4, 24    # image map
K, T, DP = 3, 2, 16         # prompts per image, tokens per prompt, prompt width
CONFIG = PromptExtractorConfig(
    depth=1, width=32, num_heads=4, mlp_dim=48, num_queries=4, output_dim=20)
MODEL = PromptExtractor(CONFIG)


def _inputs(seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (B, H, W, C)), jax.random.normal(ks[1], (H, W, DP)),
          jax.random.normal(ks[2], (B, K, T, DP)), jax.random.normal(ks[3], (DP,)))


@pytest.fixture(scope="module")
def setup():
  inputs = _inputs()
  variables = jax.jit(MODEL.init)(jax.random.key(1), *inputs)
  apply = jax.jit(MODEL.apply)
  return variables, inputs, apply, apply(variables, *inputs)


def test_shape(setup):
  _, _, _, out = setup
  assert out.shape == (B, K, CONFIG.num_queries, CONFIG.output_dim)
  assert out.dtype == jnp.float32


def test_matches_per_prompt_reference(setup):
  """Against the official data flow written out: image repeated per prompt, the
  shared prompt projection applied to tokens and dense prompt, queries first,
  one Dense per query."""
  variables, (image, pe, prompts, dense), _, out = setup
  p = nn.unbox(variables)["params"]

  def dense_layer(q, x):
    return x @ p[q]["kernel"] + p[q]["bias"]

  two_way = TwoWayTransformer(depth=1, embedding_dim=32, num_heads=4, mlp_dim=48)

  @jax.jit
  def reference():
    src = dense_layer("image_proj", image).reshape(B, H * W, 32) + dense_layer("prompt_proj", dense)
    pos = dense_layer("pe_proj", pe).reshape(H * W, 32)
    # The official flow: (image, prompt) pairs flattened into one batch of B*K.
    tokens = jnp.concatenate(
        [jnp.broadcast_to(p["output_tokens"], (B, K, 4, 32)), dense_layer("prompt_proj", prompts)],
        axis=2).reshape(B * K, 4 + T, 32)
    hs, _ = two_way.apply(
        {"params": p["transformer"]}, jnp.repeat(src, K, axis=0),
        jnp.broadcast_to(pos, (B * K, H * W, 32)), tokens)
    ref = jnp.einsum("nqw,qwo->nqo", hs[:, :4], p["output_heads"]["kernel"])
    return (ref + p["output_heads"]["bias"]).reshape(B, K, 4, 20)

  np.testing.assert_allclose(out, reference(), atol=2e-5, rtol=0)


def test_prompt_outputs_are_independent(setup):
  variables, (image, pe, prompts, dense), apply, out = setup
  changed = prompts.at[:, 1].set(jax.random.normal(jax.random.key(9), (B, T, DP)))
  out2 = apply(variables, image, pe, changed, dense)
  np.testing.assert_allclose(out2[:, 0], out[:, 0], atol=1e-6, rtol=0)
  np.testing.assert_allclose(out2[:, 2], out[:, 2], atol=1e-6, rtol=0)
  assert float(jnp.max(jnp.abs(out2[:, 1] - out[:, 1]))) > 1e-2


def test_single_prompt_run_equals_batched(setup):
  variables, (image, pe, prompts, dense), apply, out = setup
  for k in range(K):
    alone = apply(variables, image, pe, prompts[:, k:k + 1], dense)
    np.testing.assert_allclose(alone[:, 0], out[:, k], atol=1e-5, rtol=0)


def test_inputs_matter(setup):
  variables, (image, pe, prompts, dense), apply, out = setup
  # Different prompts of one image, and one prompt on different images.
  assert float(jnp.min(jnp.max(jnp.abs(out[:, 0] - out[:, 1]), axis=(-1, -2)))) > 1e-2
  same_prompt = jnp.broadcast_to(prompts[:1], prompts.shape)
  out_same = apply(variables, image, pe, same_prompt, dense)
  assert float(jnp.max(jnp.abs(out_same[0] - out_same[1]))) > 1e-2
  out_pe = apply(variables, image, pe * 0.0, prompts, dense)
  assert float(jnp.max(jnp.abs(out_pe - out))) > 1e-2
  out_dense = apply(variables, image, pe, prompts, dense * 0.0)
  assert float(jnp.max(jnp.abs(out_dense - out))) > 1e-2


def test_params_have_known_logical_axes(setup):
  variables, _, _, _ = setup
  assert_known_axis_names(variables["params"])
  p = nn.unbox(variables)["params"]
  assert p["output_tokens"].shape == (4, 32)
  assert p["output_heads"]["kernel"].shape == (4, 32, 20)
  assert p["output_heads"]["bias"].shape == (4, 20)
  # Transformer params are shared across prompts (no K axis from the vmap).
  assert p["transformer"]["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)


def test_runs_sharded_on_a_mesh(setup):
  variables, inputs, _, out = setup
  # Auto axes: t5x-style logical constraints are hints; jax 0.10's default
  # Explicit axes would need an out_sharding on every sharded contraction.
  partitioner = partitioning.Partitioner((2, 1, 4), "dp")
  placed = jax.device_put(nn.unbox(variables), partitioner.shardings_of(variables))
  with partitioner.context():
    sharded = jax.jit(MODEL.apply)(placed, *inputs)
  np.testing.assert_allclose(sharded, out, atol=1e-5, rtol=0)
