"""Tests for models/prompt_extractor.py: wiring, per-prompt independence, sharding names."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax import sharding
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
  mesh = jax.make_mesh((2, 4), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shardings = sharding.logical_to_sharding(nn.get_partition_spec(variables), mesh)
  placed = jax.device_put(nn.unbox(variables), shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.AXIS_RULES):
    sharded = jax.jit(MODEL.apply)(placed, *inputs)
  np.testing.assert_allclose(sharded, out, atol=1e-5, rtol=0)


def test_config_is_gin_configurable():
  # A scoped binding, so nothing leaks into other tests' unscoped configs.
  with gin.unlock_config():
    gin.parse_config("test_prompt_extractor/PromptExtractorConfig.num_queries = 7")
  with gin.config_scope("test_prompt_extractor"):
    assert PromptExtractorConfig().num_queries == 7
  assert PromptExtractorConfig().num_queries == 32


def test_prompt_side_inputs_pass_unprojected_when_widths_match():
  """As the official adapter: prompt tokens, dense prompt and image PE are used as
  they are when their width equals the transformer width (no prompt/pe projections)."""
  import jax
  import jax.numpy as jnp
  from pixelllm_jax.models.prompt_extractor import PromptExtractor, PromptExtractorConfig
  cfg = PromptExtractorConfig(depth=1, width=16, num_heads=2, mlp_dim=32, num_queries=3,
                              output_dim=8)
  image = jnp.ones((1, 2, 2, 5))
  prompts = jnp.ones((1, 1, 2, 16))
  params = jax.eval_shape(
      lambda: PromptExtractor(cfg).init(jax.random.key(0), image, jnp.ones((2, 2, 16)),
                                        prompts, jnp.ones((16,))))["params"]
  assert "prompt_proj" not in params and "pe_proj" not in params
  assert "image_proj" in params
  wider = jax.eval_shape(
      lambda: PromptExtractor(cfg).init(jax.random.key(0), image, jnp.ones((2, 2, 12)),
                                        jnp.ones((1, 1, 2, 12)), jnp.ones((12,))))["params"]
  assert "prompt_proj" in wider and "pe_proj" in wider


@pytest.mark.parametrize("fuse, extra", [("sparse", 0), ("dense", None), ("sparse+dense", 3)])
def test_fuse_modes_choose_the_tokens_that_reach_the_lm(fuse, extra):
  """'sparse': the Q queries; 'dense': the h*w updated image tokens; both: queries first."""
  import jax
  import jax.numpy as jnp
  from pixelllm_jax.models.prompt_extractor import PromptExtractor, PromptExtractorConfig
  cfg = PromptExtractorConfig(depth=1, width=16, num_heads=2, mlp_dim=32, num_queries=3,
                              output_dim=8, fuse=fuse)
  args = (jnp.ones((1, 2, 2, 5)), jnp.ones((2, 2, 12)), jnp.ones((1, 1, 2, 12)), jnp.ones((12,)))
  model = PromptExtractor(cfg)
  variables = model.init(jax.random.key(0), *args)
  out = model.apply(variables, *args)
  assert out.shape == (1, 1, cfg.num_tokens((2, 2)), 8)
  assert cfg.num_tokens((2, 2)) == {"sparse": 3, "dense": 4, "sparse+dense": 7}[fuse]
  if fuse == "sparse+dense":
    sparse = PromptExtractor(PromptExtractorConfig(depth=1, width=16, num_heads=2, mlp_dim=32,
                                                   num_queries=3, output_dim=8))
    params = {k: v for k, v in variables["params"].items() if k != "dense_head"}
    np.testing.assert_allclose(out[:, :, :extra], sparse.apply({"params": params}, *args),
                               atol=1e-6)


def test_unknown_fuse_mode_is_refused():
  from pixelllm_jax.models.prompt_extractor import PromptExtractorConfig
  with pytest.raises(ValueError, match="fuse"):
    PromptExtractorConfig(fuse="concat")


def test_dense_tokens_carry_the_grid_position():
  """On a constant image map the updated image tokens are alike everywhere; the
  dense tokens must still differ by grid position (the PE is added back)."""
  import jax
  import jax.numpy as jnp
  from pixelllm_jax.models.prompt_extractor import PromptExtractor, PromptExtractorConfig
  cfg = PromptExtractorConfig(depth=1, width=16, num_heads=2, mlp_dim=32, num_queries=3,
                              output_dim=8, fuse="dense")
  pe = jax.random.normal(jax.random.key(1), (2, 2, 16))
  args = (jnp.ones((1, 2, 2, 5)), pe, jnp.ones((1, 1, 2, 16)), jnp.zeros((16,)))
  model = PromptExtractor(cfg)
  variables = model.init(jax.random.key(0), *args)
  out = np.asarray(model.apply(variables, *args))[0, 0]  # [h*w, 8]
  spread = np.abs(out - out.mean(0, keepdims=True)).mean()
  assert spread > 0.1, spread
