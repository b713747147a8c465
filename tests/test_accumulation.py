"""Gradient accumulation (`trainer.make_train_step(num_microbatches=k)`) equals one step on the
whole batch.

The batch is deliberately uneven: the odd rows hold one caption token per slot and no points,
the even rows trace and referring slots with many, so micro-batches carry very different token
counts (and different tasks). Averaging each micro-batch's own loss would then be wrong: the
loss-level test shows the mean of the micro-batch losses misses the whole batch's by about 38%
(asserted: more than 10%), while the summed shares match it to float rounding.

The train-step tests use the toy composer (tests/model_fixtures.py) without dropout, with LoRA
and a frozen tower, and plain SGD at learning rate 1: the updated parameters then differ from
the initial ones by exactly the gradient, so comparing them compares gradients. (Adam would
divide every gradient by its own magnitude and turn rounding noise on the exactly-zero gradients
into full-size updates; test_sharded_train explains those leaves.) Tolerances, float32: loss and
metrics 1e-6 relative (a sum of k shares instead of one reduction: measured <= 2.4e-7), updated
parameters 3e-5 absolute for gradients up to 7 (measured <= 9e-6 on one device, 1.1e-5 on the
fsdp mesh).
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import model_fixtures as mf
from pixelllm_jax import configurables, losses
from pixelllm_jax.batch import Batch, Output
from pixelllm_jax.model import PixelLLMModel
from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.tasks import TASKS
from pixelllm_jax.train import optim, state as state_lib, trainer
from test_train_step import ToyIterator, ToyModel, toy_batch, toy_loss

B, K, N, L, LC = 8, 2, 2, 6, 4
FROZEN = ("prompt_encoder",)


def uneven_batch(seed: int = 3) -> Batch:
  """`random_batch` with odd rows of one caption token per slot, no points (docstring)."""
  b = mf.random_batch(seed, b=B, k=K, n=N, l=L, lc=LC)
  odd = np.arange(B) % 2 == 1
  text_w, point_w = b.decoder_loss_weights.copy(), b.point_weights.copy()
  text_w[odd, :, 1:] = 0.0
  point_w[odd] = 0.0
  point_w[~odd, :, 0] = 1.0  # the first target is always a word
  task_ids = np.where(odd[:, None], TASKS.index("caption"),
                      np.array([[TASKS.index("trace"), TASKS.index("refer")]]))
  return b.replace(decoder_loss_weights=text_w, point_weights=point_w,
                   task_ids=task_ids.astype(np.int32))


def part(tree, m: int, k: int):
  """Micro-batch m of k as the trainer splits (rows m, m + k, ...)."""
  return jax.tree.map(lambda x: x[m::k], tree)


@pytest.mark.parametrize("per_task_mean", [True, False])
def test_loss_shares_sum_to_the_whole_batch_and_micro_means_do_not(per_task_mean):
  batch = uneven_batch()
  r = np.random.RandomState(0)
  out = Output(logits=jnp.asarray(r.randn(B, N, L, mf.VOCAB), jnp.float32),
               points=jnp.asarray(r.rand(B, N, L, mf.POINTS, 2), jnp.float32),
               hidden=jnp.zeros((B, N, L, 1)))
  cfg = losses.LossConfig(box_giou_weight=1.0, per_task_mean=per_task_mean)
  whole_loss, whole = losses.compute_losses(out, batch, cfg)
  norms = losses.normalizers(batch, cfg)
  for k in (2, 4):
    shares = [losses.compute_losses(part(out, m, k), part(batch, m, k), cfg, whole=norms)
              for m in range(k)]
    np.testing.assert_allclose(sum(float(s[0]) for s in shares), whole_loss, rtol=1e-6)
    for name, value in whole.items():
      np.testing.assert_allclose(sum(float(s[1][name]) for s in shares), value, rtol=1e-6,
                                 atol=1e-7, err_msg=name)
    # What accumulation must not do: average each micro-batch's own mean.
    micro_mean = np.mean([float(losses.compute_losses(part(out, m, k), part(batch, m, k),
                                                      cfg)[0]) for m in range(k)])
    assert abs(micro_mean - float(whole_loss)) > 0.1 * float(whole_loss), (k, micro_mean)


def _model():
  # No SAM tower (one image encoder is enough here and keeps each compile ~25% shorter).
  return PixelLLMModel(mf.toy_config(lora_rank=2, sam=False, frozen=FROZEN),
                       loss=losses.LossConfig(box_giou_weight=1.0))


class _Setup:
  """The model, SGD and a freshly initialized state on `partitioner` (init compiled once)."""

  def __init__(self, partitioner: Partitioner):
    self.partitioner, self.model = partitioner, _model()
    self.tx = optim.with_frozen(optax.sgd(1.0), self.model.trainable)
    self.spec = state_lib.state_spec(self.model, uneven_batch(), self.tx, partitioner)
    self.state = self.spec.init(jax.random.key(0))

  def step(self, k: int):
    """(initial params, params after one step with k micro-batches, metrics)."""
    step = trainer.make_train_step(self.model, self.tx, partitioner=self.partitioner,
                                   state_shardings=self.spec.shardings, num_microbatches=k)
    state = jax.tree.map(jnp.copy, self.state)  # the step donates its state
    state, metrics = step(state, self.partitioner.shard_batch(uneven_batch()), jax.random.key(1))
    return jax.device_get(self.state.params), jax.device_get(state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def one_device():
  return _Setup(Partitioner((1, 1, 1), "dp", jax.devices()[:1]))


@pytest.fixture(scope="module")
def whole_batch_step(one_device):
  return one_device.step(1)


def _assert_same_step(got, want):
  init, params, metrics = got
  ref_init, ref_params, ref_metrics = want
  jax.tree.map(np.testing.assert_array_equal, init, ref_init)
  assert metrics.keys() == ref_metrics.keys()
  for name in ref_metrics:
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-6, atol=1e-7,
                               err_msg=name)
  assert float(metrics["nonfinite"]) == 0.0
  got_p, want_p = (traverse_util.flatten_dict(p, sep="/") for p in (params, ref_params))
  assert got_p.keys() == want_p.keys()
  for path in want_p:
    np.testing.assert_allclose(got_p[path], want_p[path], atol=3e-5, rtol=0, err_msg=path)
  # The step really moved the trainable parameters, and not the frozen tower.
  flat_init = traverse_util.flatten_dict(init, sep="/")
  assert np.abs(got_p["t5/decoder/logits_dense/kernel"]
                - flat_init["t5/decoder/logits_dense/kernel"]).max() > 1e-2
  jax.tree.map(np.testing.assert_array_equal, params["prompt_encoder"], init["prompt_encoder"])


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_the_whole_batch(one_device, whole_batch_step, k):
  _assert_same_step(one_device.step(k), whole_batch_step)


@pytest.mark.slow
def test_accumulation_on_an_fsdp_mesh_equals_the_whole_batch(whole_batch_step):
  # data 2 x fsdp 2 x model 2: 4 batch shards, so 2 micro-batches of 4 rows, one per shard.
  _assert_same_step(_Setup(Partitioner((2, 2, 2), "fsdp")).step(2), whole_batch_step)


class ShareToyModel(ToyModel):
  """test_train_step's toy model (dropout 0.5) with its loss split into shares."""

  def loss_normalizers(self, batch):
    return batch.decoder_loss_weights.sum(), batch.point_weights.sum()

  def loss_share(self, params, batch, rng, normalizers):
    output = self.net.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
    # toy_loss's means, rescaled from this part's counts to the whole batch's.
    _, m = toy_loss(output, batch)
    text = m["caption_loss"] * jnp.maximum(batch.decoder_loss_weights.sum(), 1.0)
    point = m["point_loss"] * jnp.maximum(batch.point_weights.sum(), 1.0)
    text, point = text / jnp.maximum(normalizers[0], 1.0), point / jnp.maximum(normalizers[1], 1.0)
    return text + point, {"caption_loss": text, "point_loss": point}


def test_micro_batch_m_draws_dropout_from_the_step_key_folded_with_m():
  model, k = ShareToyModel(), 2
  partitioner = Partitioner((1, 1, 1), "dp", jax.devices()[:1])
  tx = optim.with_frozen(optax.sgd(0.0), model.trainable)
  batch = toy_batch(0)
  spec = state_lib.state_spec(model, batch, tx, partitioner)
  state = spec.init(jax.random.key(0))
  params = jax.device_get(state.params)
  step = trainer.make_train_step(model, tx, partitioner=partitioner,
                                 state_shardings=spec.shardings, num_microbatches=k)
  rng = jax.random.key(5)
  _, metrics = step(state, partitioner.shard_batch(batch), rng)
  step_key = jax.random.fold_in(rng, 0)  # state.step = 0
  norms = model.loss_normalizers(batch)
  want = sum(float(model.loss_share(params, part(batch, m, k), jax.random.fold_in(step_key, m),
                                    norms)[0]) for m in range(k))
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)
  # Dropout is on: another key scheme (here, the whole-batch step's key per micro-batch)
  # gives another loss.
  other = sum(float(model.loss_share(params, part(batch, m, k), step_key, norms)[0])
              for m in range(k))
  assert abs(other - want) > 1e-3


def test_batch_must_divide_into_micro_batches_over_the_batch_shards(tmp_path):
  mesh = Partitioner((2, 2, 2), "fsdp")  # 4 batch shards
  trainer.check_microbatches(16, 4, mesh)
  with pytest.raises(ValueError, match="multiple of num_microbatches x batch shards = 16"):
    trainer.check_microbatches(8, 4, mesh)
  with pytest.raises(ValueError, match="num_microbatches must be >= 1"):
    trainer.check_microbatches(8, 0, mesh)
  # `train` checks at start-up, before anything is written (8 devices: 8 batch shards).
  with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
    trainer.train(model_dir=str(tmp_path / "run"), model=ShareToyModel(),
                  train_data=ToyIterator(b=8), num_steps=1,
                  optimizer=optax.sgd(0.1), num_microbatches=3)
  assert not (tmp_path / "run" / "checkpoints").exists()
  # A model whose loss does not split cannot accumulate.
  with pytest.raises(ValueError, match="ToyModel does not implement loss_normalizers"):
    trainer.make_train_step(ToyModel(), optax.sgd(0.1), partitioner=mesh, state_shardings=None,
                            num_microbatches=2)
  # Gin binds it as it binds the loop's other options (`train.num_microbatches = 4`).
  assert "num_microbatches" in inspect.signature(configurables.train).parameters
