"""bfloat16 compute (`partitioning.DtypePolicy(compute_dtype='bfloat16')`) on the toy composer:
the loss and the gradients stay close to float32's, and the numbers that must stay float32 do
(parameters, optimizer state, losses and metrics).

Tolerances. bfloat16 keeps 8 significant bits (7 stored), so each cast of an activation or a
weight rounds by up to 2^-9 = 0.2% relative, and bf16 compute rounds at every layer, forward
and backward.
- Loss and loss metrics: 1% relative (5 roundings' worth; measured 0.04%). The loss is a mean
  over many tokens, computed in float32 from the logits, so roundings largely average out.
- Gradients: 15% relative L2 error per top-level tower, ||g_bf16 - g_f32|| / ||g_f32||
  (measured: loc_head 1%, t5 2.3%, visual_proj 3.8%, prompt_encoder 5.6%, extractor 5.9%,
  eva02 10%). The error grows with the distance from the loss: the gradient reaching EVA02
  has passed back through every tower. At this random toy init the gradients are
  ill-conditioned: in float32, merely rounding the *weights* to bf16 moves EVA02's gradient by
  2.6%, and a random 2^-9 relative perturbation of the weights by 5%, so rounding every
  activation too gives the 10% measured; 15% leaves room for the reduction order.
A tower that does not compute in bf16 at all is caught by the jaxpr check instead (most
matmuls must produce bf16).
"""
import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_fixtures as mf
from pixelllm_jax.model import PixelLLMModel
from pixelllm_jax.partitioning import DtypePolicy, Partitioner
from pixelllm_jax.train import optim, state as state_lib, trainer

B, K, N, L, LC = 2, 2, 2, 6, 4
LOSS_RTOL, GRAD_RTOL = 1e-2, 0.15
BF16 = DtypePolicy(compute_dtype="bfloat16")


def _model(dtype: DtypePolicy = DtypePolicy(), sam: bool = True) -> PixelLLMModel:
  return PixelLLMModel(mf.toy_config(lora_rank=2, sam=sam), dtype=dtype)


@pytest.fixture(scope="module")
def batch():
  return mf.random_batch(0, b=B, k=K, n=N, l=L, lc=LC)


@pytest.fixture(scope="module")
def params(batch):
  return nn.meta.unbox(jax.jit(_model().init)(jax.random.key(0), batch))


def _loss_and_grads(model, params, batch):
  fn = jax.jit(jax.value_and_grad(lambda p: model.loss(p, batch, jax.random.key(1)),
                                  has_aux=True))
  return jax.device_get(fn(params)), fn


def _rel_l2(got, want) -> float:
  diff = sum(float(np.sum((np.asarray(g, np.float64) - w) ** 2))
             for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  norm = sum(float(np.sum(np.asarray(w, np.float64) ** 2)) for w in jax.tree.leaves(want))
  return (diff / norm) ** 0.5


def test_bf16_loss_and_gradients_are_close_to_float32(params, batch):
  model16 = _model(BF16)
  assert model16.config.t5.dtype == model16.config.eva02.dtype == jnp.bfloat16
  assert jax.tree.structure(jax.eval_shape(model16.init, jax.random.key(0), batch)) == \
      jax.tree.structure(jax.eval_shape(_model().init, jax.random.key(0), batch))
  ((loss32, metrics32), grads32), _ = _loss_and_grads(_model(), params, batch)
  ((loss16, metrics16), grads16), fn16 = _loss_and_grads(model16, params, batch)

  # The policy really computes in bf16: nearly every matmul (forward and backward) gives bf16
  # (measured 325 of 331; float32 ones are allowed where a tower keeps float32 on purpose).
  dots = collections.Counter(re.findall(r":(\w+)\[[^\]]*\] = dot_general",
                                        str(jax.make_jaxpr(fn16)(params))))
  assert dots["bf16"] >= 0.9 * sum(dots.values()), dots
  assert loss16 != loss32
  # Losses and metrics are float32 whatever the compute dtype.
  assert loss16.dtype == np.float32
  assert {np.asarray(v).dtype for v in metrics16.values()} == {np.dtype("float32")}

  np.testing.assert_allclose(loss16, loss32, rtol=LOSS_RTOL)
  for name in ("text_loss", "point_loss"):
    np.testing.assert_allclose(metrics16[name], metrics32[name], rtol=LOSS_RTOL, err_msg=name)
  assert {x.dtype for x in jax.tree.leaves(grads16)} == {np.dtype("float32")}
  for tower in grads32:
    if not any(np.any(g) for g in jax.tree.leaves(grads32[tower])):
      # A frozen tower (SAM): the composer stops its gradient in both dtypes.
      assert not any(np.any(g) for g in jax.tree.leaves(grads16[tower])), tower
      continue
    err = _rel_l2(grads16[tower], grads32[tower])
    assert err < GRAD_RTOL, (tower, err)


def test_bf16_train_step_keeps_float32_master_weights_and_optimizer_state(batch):
  model = _model(BF16, sam=False)  # (one image tower is enough here: a shorter compile)
  partitioner = Partitioner((1, 1, 1), "dp", jax.devices()[:1])
  tx = optim.with_frozen(optim.make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=10,
                                              weight_decay=0.01, grad_clip_norm=1.0),
                         model.trainable)
  spec = state_lib.state_spec(model, batch, tx, partitioner)
  state = spec.init(jax.random.key(0))
  init = jax.device_get(state.params)
  step = trainer.make_train_step(model, tx, partitioner=partitioner,
                                 state_shardings=spec.shardings)
  for i in range(2):  # the first update runs at learning rate 0 (warmup), the second moves
    state, metrics = step(state, partitioner.shard_batch(batch), jax.random.key(1))
  float32 = np.dtype("float32")
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {float32}
  opt_floats = {x.dtype for x in jax.tree.leaves(state.opt_state)
                if jnp.issubdtype(x.dtype, jnp.floating)}
  assert opt_floats == {float32}
  assert {x.dtype for x in metrics.values()} == {float32}
  assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0.0
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       jax.device_get(state.params["t5"]), init["t5"])
  assert max(jax.tree.leaves(moved)) > 1e-4
