"""The real PixelLLM train step on a data x model mesh equals the one-device step.

Toy-size composer (tests/model_fixtures.py) with LoRA and T5 dropout, `losses.compute_losses`, the
project optimizer with the paper's freezing preset, state born sharded
(`state.create_sharded_state`) and the jitted, donated `trainer.make_train_step`. Two steps on an
8-device fake CPU mesh (data=4 x model=2) must give the same losses (1e-5 relative) and updated
parameters (1e-5 absolute) as on a 1x1 mesh, and the wide parameters must really be split over
'model'.

One exception, by construction: an attention key bias has an exactly zero gradient (it adds
q . b_k to every score of a query, and softmax ignores a constant shift), so its computed gradient
is rounding noise of order 1e-10 whose value depends on the reduction order. Adam divides it by
sqrt(v) + eps and turns it into updates of order lr * 0.03, different on every mesh. Those leaves
(the two-way transformer's `k_proj/bias`; test_pixel_llm checks their gradient is noise) are left
out of the parameter comparison; the losses, which they cannot affect, and every other parameter
are compared at the fixed tolerances.
"""
import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import model_fixtures as mf
from pixelllm_jax import losses
from pixelllm_jax.models.pixel_llm import PixelLLM
from pixelllm_jax.train import optim, state as state_lib, trainer

B, K, N, L, LC = 4, 2, 2, 6, 4
STEPS = 2


def _mesh(shape):
  devices = np.array(jax.devices()[: shape[0] * shape[1]])
  return jax.make_mesh(shape, ("data", "model"), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _model():
  return PixelLLM(mf.toy_config(lora_rank=2, dropout_rate=0.1))


def _optimizer():
  # warmup_steps=1: the first update runs at learning rate 0, the second at the peak.
  return optim.make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=10,
                              weight_decay=0.01, grad_clip_norm=1.0,
                              trainable=optim.trainable_predicate("paper"))


def _run(shape):
  mesh = _mesh(shape)
  model, tx = _model(), _optimizer()
  state, shardings = state_lib.create_sharded_state(
      model, mf.random_batch(0, b=B, k=K, n=N, l=L, lc=LC), tx, mesh, jax.random.key(0))
  init_params = jax.device_get(state.params)
  step = trainer.make_train_step(model, losses.compute_losses, tx, mesh=mesh,
                                 state_shardings=shardings)
  losses_ = []
  for i in range(STEPS):
    batch = trainer.shard_batch(mf.random_batch(100 + i, b=B, k=K, n=N, l=L, lc=LC), mesh)
    state, metrics = step(state, batch, jax.random.key(1))
    losses_.append(float(metrics["loss"]))
  return state, shardings, init_params, losses_


@pytest.fixture(scope="module")
def single_device():
  state, _, init_params, losses_ = _run((1, 1))
  return jax.device_get(state.params), init_params, losses_


def _get(tree, path):
  for p in path.split("/"):
    tree = tree[p]
  return tree


@pytest.mark.slow
def test_sharded_step_matches_single_device(single_device):
  ref_params, ref_init, ref_losses = single_device
  state, shardings, init_params, losses_ = _run((4, 2))

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

  # The wide parameters are split over 'model' as AXIS_RULES say ('mlp', 'joined_kv', 'vocab').
  split = {
      "t5/encoder/layers_0/mlp/wi_0/kernel": P(None, "model"),
      "t5/decoder/layers_0/self_attention/query/kernel": P(None, "model"),
      "t5/decoder/layers_0/self_attention/out/kernel": P("model", None),
      "t5/decoder/layers_0/self_attention/query/lora_b": P(None, "model"),
      "t5/decoder/logits_dense/kernel": P(None, "model"),
      "loc_head/dense_0/kernel": P(None, "model"),
  }
  for path, spec in split.items():
    x = _get(state.params, path)
    assert x.sharding == _get(shardings.params, path), path
    assert x.sharding.spec == spec, (path, x.sharding.spec)
    model_axis = list(spec).index("model")
    shard_shape = x.addressable_shards[0].data.shape
    assert shard_shape[model_axis] == x.shape[model_axis] // 2, (path, shard_shape, x.shape)
  # Adam moments live where their parameter lives; frozen towers carry none.
  kernel_path = ("t5", "encoder", "layers_0", "mlp", "wi_0", "kernel")
  moments = [x for kp, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if optim.path_of(kp)[-len(kernel_path):] == kernel_path]
  assert len(moments) == 2
  assert all(m.sharding == _get(state.params, "/".join(kernel_path)).sharding for m in moments)
  moment_roots = {optim.path_of(kp)[optim.path_of(kp).index("mu") + 1]
                  for kp, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
                  if "mu" in optim.path_of(kp)}
  assert "t5" in moment_roots and not moment_roots & {"sam", "prompt_encoder"}
