"""The real PixelLLM train step on an 8-device fake CPU mesh (data 2 x fsdp 2 x model 2) equals
the one-device step, and each rule set splits the parameters and optimizer moments as it says.

The shard shapes of every rule set are also checked from the abstract state alone (no compile).

Toy-size composer (tests/model_fixtures.py) with LoRA and T5 dropout, SAM and the prompt
encoder frozen (`PixelLLMConfig.frozen`), the project's losses and optimizer, the state born
sharded (`state.state_spec`) and the jitted, donated `trainer.make_train_step`. Two steps per
rule set must give the same losses (1e-5 relative) and updated parameters (1e-5 absolute) as on
one device, and the parameters the rule set splits must have split shards.

One exception, by construction: an attention key bias has an exactly zero gradient (it adds
q . b_k to every score of a query, and softmax ignores a constant shift), so its computed gradient
is rounding noise of order 1e-10 whose value depends on the reduction order. Adam divides it by
sqrt(v) + eps and turns it into updates of order lr * 0.03, different on every mesh. Those leaves
(the two-way transformer's `k_proj/bias`; test_pixel_llm checks their gradient is noise) are left
out of the parameter comparison; the losses, which they cannot affect, and every other parameter
are compared at the fixed tolerances.
"""
import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import model_fixtures as mf
from pixelllm_jax.losses import LossConfig
from pixelllm_jax.model import PixelLLMModel
from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.train import optim, state as state_lib, trainer
from pixelllm_jax.tree_paths import path_of

B, K, N, L, LC = 4, 2, 2, 6, 4
STEPS = 2


def _model():
  return PixelLLMModel(mf.toy_config(lora_rank=2, dropout_rate=0.1,
                                     frozen=("sam", "prompt_encoder")),
                       loss=LossConfig(box_giou_weight=1.0))


def _run(partitioner):
  model = _model()
  # warmup_steps=1: the first update runs at learning rate 0, the second at the peak.
  tx = optim.with_frozen(optim.make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=10,
                                              weight_decay=0.01, grad_clip_norm=1.0),
                         model.trainable)
  spec = state_lib.state_spec(model, mf.random_batch(0, b=B, k=K, n=N, l=L, lc=LC), tx,
                              partitioner)
  state = spec.init(jax.random.key(0))
  init_params = jax.device_get(state.params)
  step = trainer.make_train_step(model, tx, partitioner=partitioner,
                                 state_shardings=spec.shardings)
  losses_ = []
  for i in range(STEPS):
    batch = partitioner.shard_batch(mf.random_batch(100 + i, b=B, k=K, n=N, l=L, lc=LC))
    state, metrics = step(state, batch, jax.random.key(1))
    losses_.append(float(metrics["loss"]))
  return state, spec.shardings, init_params, losses_


@pytest.fixture(scope="module")
def single_device():
  state, _, init_params, losses_ = _run(Partitioner((1, 1, 1), "dp", jax.devices()[:1]))
  return jax.device_get(state.params), init_params, losses_


def _get(tree, path):
  for p in path.split("/"):
    tree = tree[p]
  return tree


# path -> expected spec, per rule set. 'embed' over fsdp, the wide axes over model.
SPLIT = {
    "dp": {
        "t5/encoder/layers_0/mlp/wi_0/kernel": P(None, "model"),
        "t5/decoder/layers_0/self_attention/out/kernel": P("model", None),
        "t5/decoder/layers_0/self_attention/query/lora_b": P(None, "model"),
        "t5/decoder/logits_dense/kernel": P(None, "model"),
        "loc_head/dense_0/kernel": P(None, "model"),
        "eva02/blocks_0/attn/q_proj/kernel": P(None, "model"),
    },
    "fsdp": {
        "t5/encoder/layers_0/mlp/wi_0/kernel": P("fsdp", None),
        "t5/decoder/layers_0/self_attention/out/kernel": P(None, "fsdp"),
        "t5/token_embedder/embedding": P(None, "fsdp"),
        "t5/decoder/logits_dense/kernel": P("fsdp", None),
        "eva02/blocks_0/attn/q_proj/kernel": P("fsdp", None),
        "extractor/output_tokens": P(None, "fsdp"),
    },
    "fsdp_tp": {
        "t5/encoder/layers_0/mlp/wi_0/kernel": P("fsdp", "model"),
        "t5/decoder/layers_0/self_attention/out/kernel": P("model", "fsdp"),
        "t5/token_embedder/embedding": P("model", "fsdp"),
        "t5/decoder/logits_dense/kernel": P("fsdp", "model"),
        "eva02/blocks_0/attn/q_proj/kernel": P("fsdp", "model"),
        "loc_head/dense_0/kernel": P("fsdp", "model"),
    },
}


@pytest.mark.parametrize("rules", sorted(SPLIT))
def test_rule_set_splits_parameters_and_their_moments(rules):
  partitioner = Partitioner((2, 2, 2), rules)
  model = _model()
  tx = optim.with_frozen(optim.make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=10,
                                              weight_decay=0.01), model.trainable)
  spec = state_lib.state_spec(model, mf.random_batch(0, b=B, k=K, n=N, l=L, lc=LC), tx,
                              partitioner)
  for path, want in SPLIT[rules].items():
    sharding, shape = _get(spec.shardings.params, path), _get(spec.abstract.params, path).shape
    assert sharding.spec == want, (path, sharding.spec)
    want_shape = tuple(n // (2 if axis else 1) for n, axis in zip(shape, want))
    assert sharding.shard_shape(shape) == want_shape, (path, shape)
  kernel_path = ("t5", "encoder", "layers_0", "mlp", "wi_0", "kernel")
  moments = [x for kp, x in jax.tree_util.tree_leaves_with_path(spec.shardings.opt_state)
             if path_of(kp)[-len(kernel_path):] == kernel_path]
  assert len(moments) == 2
  assert all(m == _get(spec.shardings.params, "/".join(kernel_path)) for m in moments)



def test_scanned_towers_keep_the_layer_axis_unsplit():
  """A scanned stack's leading 'layers' axis is never sharded; its other axes split as before."""
  cfg = mf.toy_config(lora_rank=2, frozen=("sam", "prompt_encoder"))
  cfg = dataclasses.replace(cfg, t5=dataclasses.replace(cfg.t5, scan=True),
                            eva02=dataclasses.replace(cfg.eva02, scan=True))
  model = PixelLLMModel(cfg)
  tx = optim.with_frozen(optim.make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=10,
                                              weight_decay=0.01), model.trainable)
  spec = state_lib.state_spec(model, mf.random_batch(0, b=B, k=K, n=N, l=L, lc=LC), tx,
                              Partitioner((2, 2, 2), "fsdp_tp"))
  for path, want in {"t5/encoder/layers/mlp/wi_0/kernel": P(None, "fsdp", "model"),
                     "t5/decoder/layers/self_attention/out/kernel": P(None, "model", "fsdp"),
                     "eva02/blocks/attn/q_proj/kernel": P(None, "fsdp", "model")}.items():
    sharding, shape = _get(spec.shardings.params, path), _get(spec.abstract.params, path).shape
    assert sharding.spec == want, (path, sharding.spec)
    assert sharding.shard_shape(shape) == (shape[0], shape[1] // 2, shape[2] // 2), path


@pytest.mark.slow
@pytest.mark.parametrize("rules", sorted(SPLIT))
def test_rule_set_matches_single_device(single_device, rules):
  ref_params, ref_init, ref_losses = single_device
  partitioner = Partitioner((2, 2, 2), rules)
  state, shardings, init_params, losses_ = _run(partitioner)

  # Same init on both meshes, and the steps really moved the trainable params.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), init_params, ref_init)
  moved = _get(ref_params, "t5/decoder/logits_dense/kernel") - _get(
      ref_init, "t5/decoder/logits_dense/kernel")
  assert np.abs(moved).max() > 1e-4
  for path in ("sam", "prompt_encoder"):
    jax.tree.map(np.testing.assert_array_equal, ref_params[path], ref_init[path])

  np.testing.assert_allclose(losses_, ref_losses, rtol=1e-5, atol=0)
  got = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
  want = traverse_util.flatten_dict(ref_params, sep="/")
  assert got.keys() == want.keys()
  zero_grad = sorted(k for k in got if k.endswith("k_proj/bias"))
  assert zero_grad and all(k.startswith("extractor/transformer/") for k in zero_grad)
  for path in sorted(set(got) - set(zero_grad)):
    np.testing.assert_allclose(got[path], want[path], atol=1e-5, rtol=0, err_msg=path)

  # The parameters are split as the rule set says, with shards of the split shape.
  for path, spec in SPLIT[rules].items():
    x = _get(state.params, path)
    assert x.sharding == _get(shardings.params, path), path
    assert x.sharding.spec == spec, (path, x.sharding.spec)
    shard_shape = x.addressable_shards[0].data.shape
    want_shape = tuple(n // (2 if axis else 1) for n, axis in zip(x.shape, spec))
    assert shard_shape == want_shape, (path, shard_shape, x.shape)
  # Adam moments live where their parameter lives; frozen towers carry none.
  kernel_path = ("t5", "encoder", "layers_0", "mlp", "wi_0", "kernel")
  moments = [x for kp, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if path_of(kp)[-len(kernel_path):] == kernel_path]
  assert len(moments) == 2
  assert all(m.sharding == _get(state.params, "/".join(kernel_path)).sharding for m in moments)
  moment_roots = {path_of(kp)[path_of(kp).index("mu") + 1]
                  for kp, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
                  if "mu" in path_of(kp)}
  assert "t5" in moment_roots and not moment_roots & {"sam", "prompt_encoder"}
