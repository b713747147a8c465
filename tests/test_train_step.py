"""The sharded train step, the optimizer's freezing and its schedule.

Also home of the toy model, loss and data iterator the other train tests import
(`from test_train_step import ...`): a `model.BaseModel` over a linen Module
that consumes a Batch and returns an Output (token embedding -> Dense over
'embed'->'mlp' -> logits and a points head), small enough to compile in about
a second.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax import layers, lora
from pixelllm_jax.batch import Batch, Output
from pixelllm_jax.model import BaseModel
from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.train import optim, state as state_lib, trainer
from pixelllm_jax.tree_paths import path_of

VOCAB, WIDTH, HIDDEN, P_POINTS = 16, 8, 16, 2
B, K, N, LC, L, HW = 8, 1, 2, 3, 4, 4


class ToyNet(nn.Module):
  """Embeds decoder tokens, mixes in a pooled image feature, predicts logits and points.

  Top-level submodule names match the composer's ('t5', 'sam', 'loc_head') so
  the freezing predicate sees realistic paths; 't5' holds a LoRA pair.
  """

  @nn.compact
  def __call__(self, batch: Batch, *, train: bool = False) -> Output:
    img = batch.image.astype(jnp.float32).mean(axis=(1, 2)) / 255.0          # [B, 3]
    img_D = layers.dense(WIDTH, ("channels", "embed"), name="sam")(img)        # [B, D]
    t5 = _ToyLM(name="t5")
    h_BxNxLxD = t5(batch.decoder_input_tokens) + img_D[:, None, None, :]
    h_BxNxLxD = nn.Dropout(0.5, deterministic=not train)(h_BxNxLxD)
    logits = layers.dense(VOCAB, ("embed", "vocab"), name="logits")(h_BxNxLxD)
    points = layers.dense(P_POINTS * 2, ("embed", "points"), name="loc_head")(h_BxNxLxD)
    points = jax.nn.sigmoid(points).reshape(*h_BxNxLxD.shape[:-1], P_POINTS, 2)
    return Output(logits=logits, points=points, hidden=h_BxNxLxD)


class _ToyLM(nn.Module):
  @nn.compact
  def __call__(self, tokens_BxNxL):
    table = self.param("embedding", layers.param_init(nn.initializers.normal(1.0),
                                                      ("vocab", "embed")), (VOCAB, WIDTH))
    x = table[tokens_BxNxL]
    h = nn.gelu(layers.dense(HIDDEN, ("embed", "mlp"), name="mlp_in")(x))
    x = x + layers.dense(WIDTH, ("mlp", "embed"), name="mlp_out")(h)
    lora_a = self.param("lora_a", layers.param_init(nn.initializers.normal(0.1),
                                                    ("embed", "lora_rank")), (WIDTH, 2))
    lora_b = self.param("lora_b", layers.param_init(nn.initializers.zeros,
                                                    ("lora_rank", "embed")), (2, WIDTH))
    return x + x @ lora_a @ lora_b


class ToyModel(BaseModel):
  """`ToyNet` + `toy_loss` behind the model API; `frozen` top-level names do not train
  (LoRA leaves inside them still do, as `PixelLLMConfig.frozen`)."""

  def __init__(self, frozen: tuple[str, ...] = ()):
    self.net, self.frozen = ToyNet(), tuple(frozen)

  def init(self, rng, batch):
    return self.net.init({"params": rng, "dropout": rng}, batch)["params"]

  def loss(self, params, batch, rng):
    output = self.net.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
    return toy_loss(output, batch)

  def trainable(self, path):
    return not path or path[0] not in self.frozen or lora.is_lora_path(path)


def toy_loss(output: Output, batch: Batch):
  """Weighted token CE plus weighted point L1; returns (loss, metrics)."""
  logp = jax.nn.log_softmax(output.logits)
  tgt = jax.nn.one_hot(batch.decoder_target_tokens, VOCAB)
  w = batch.decoder_loss_weights
  ce = -(jnp.sum(logp * tgt, -1) * w).sum() / jnp.maximum(w.sum(), 1.0)
  pw = batch.point_weights
  l1 = (jnp.abs(output.points - batch.point_targets).sum((-1, -2)) * pw).sum() / jnp.maximum(
      pw.sum(), 1.0)
  return ce + l1, {"caption_loss": ce, "point_loss": l1}


def toy_batch(seed: int, b: int = B) -> Batch:
  r = np.random.RandomState(seed)
  tgt = r.randint(3, VOCAB, size=(b, N, L)).astype(np.int32)
  inp = np.zeros_like(tgt)
  inp[..., 1:] = tgt[..., :-1]
  return Batch(
      image=r.randint(0, 256, size=(b, HW, HW, 3)).astype(np.uint8),
      image_valid_hw=np.ones((b, 2), np.float32),
      prompt_boxes=np.tile(np.array([0, 0, 1, 1], np.float32), (b, K, 1)),
      prompt_index=np.zeros((b, N), np.int32),
      context_tokens=np.ones((b, N, LC), np.int32),
      decoder_input_tokens=inp,
      decoder_target_tokens=tgt,
      decoder_loss_weights=(r.rand(b, N, L) > 0.2).astype(np.float32),
      point_targets=r.rand(b, N, L, P_POINTS, 2).astype(np.float32),
      point_weights=(r.rand(b, N, L) > 0.5).astype(np.float32),
      task_ids=np.zeros((b, N), np.int32),
  )


class ToyIterator:
  """Deterministic batches `toy_batch(seed + i)`; the state is the position i."""

  def __init__(self, seed: int = 0, b: int = B):
    self.seed, self.b, self.i = seed, b, 0

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    out = toy_batch(self.seed + self.i, self.b)
    self.i += 1
    return out

  def get_state(self) -> dict:
    return {"position": self.i}

  def set_state(self, state: dict) -> None:
    self.i = int(state["position"])


def toy_optimizer(total_steps=10):
  return optim.make_optimizer(learning_rate=1e-2, warmup_steps=2, total_steps=total_steps,
                              weight_decay=0.1, grad_clip_norm=1.0)


def partitioner_of(n_data: int, n_model: int, rules: str = "dp") -> Partitioner:
  """A (data, 1, model) mesh over the first n_data * n_model devices."""
  return Partitioner((n_data, 1, n_model), rules, devices=jax.devices()[: n_data * n_model])


def sharded_state(model, tx, partitioner, batch=None):
  """(state, shardings) born sharded, with the model's freezing applied to `tx`."""
  tx = optim.with_frozen(tx, model.trainable)
  spec = state_lib.state_spec(model, toy_batch(0) if batch is None else batch, tx, partitioner)
  return spec.init(jax.random.key(0)), spec.shardings, tx


def run_steps(partitioner, n_steps, frozen=()):
  model = ToyModel(frozen)
  state, shardings, tx = sharded_state(model, toy_optimizer(), partitioner)
  step = trainer.make_train_step(model, tx, partitioner=partitioner, state_shardings=shardings)
  losses = []
  for i in range(n_steps):
    state, metrics = step(state, partitioner.shard_batch(toy_batch(100 + i)), jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return state, shardings, losses


@pytest.fixture(scope="module")
def single_device_run():
  state, _, losses = run_steps(partitioner_of(1, 1), 3)
  return jax.device_get(state.params), losses


@pytest.mark.parametrize("shape", [(4, 2), (8, 1)])
def test_sharded_step_matches_single_device(single_device_run, shape):
  ref_params, ref_losses = single_device_run
  state, shardings, losses = run_steps(partitioner_of(*shape), 3)
  # The state really is distributed as the rules say: 'mlp' over 'model'.
  kernel = state.params["t5"]["mlp_in"]["kernel"]
  assert kernel.sharding == shardings.params["t5"]["mlp_in"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  moments = [x for kp, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if path_of(kp)[-3:] == ("t5", "mlp_in", "kernel")]
  assert len(moments) == 2 and all(m.sharding == kernel.sharding for m in moments)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
               jax.device_get(state.params), ref_params)


def test_frozen_params_unchanged_and_stateless():
  model = ToyModel(frozen=("sam", "t5"))
  partitioner = partitioner_of(4, 2)
  state, shardings, tx = sharded_state(model, toy_optimizer(), partitioner)
  before = jax.device_get(state.params)
  step = trainer.make_train_step(model, tx, partitioner=partitioner, state_shardings=shardings)
  for i in range(3):
    state, _ = step(state, partitioner.shard_batch(toy_batch(i)), jax.random.key(1))
  after = jax.device_get(state.params)
  frozen = [("sam", "kernel"), ("sam", "bias"), ("t5", "embedding"), ("t5", "mlp_in", "kernel")]
  trained = [("t5", "lora_a"), ("t5", "lora_b"), ("logits", "kernel"), ("loc_head", "bias")]

  def get(tree, path):
    for p in path:
      tree = tree[p]
    return tree

  for path in frozen:
    np.testing.assert_array_equal(get(after, path), get(before, path))
  for path in trained:
    assert np.abs(get(after, path) - get(before, path)).max() > 1e-4, path
  # Adam moments exist exactly for the trainable leaves.
  moment_paths = {path_of(kp) for kp, _ in
                  jax.tree_util.tree_leaves_with_path(state.opt_state) if _.ndim > 0}
  mu_paths = {p[p.index("mu") + 1:] for p in moment_paths if "mu" in p}
  all_paths = {path_of(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(after)}
  assert mu_paths == {p for p in all_paths if model.trainable(p)}
  assert ("t5", "lora_a") in mu_paths and ("sam", "kernel") not in mu_paths


def test_weight_decay_skips_1d_leaves():
  # With zero gradients Adam's update is 0, so only decoupled weight decay moves params.
  tx = optim.make_optimizer(learning_rate=0.1, warmup_steps=1, total_steps=3,
                            weight_decay=0.5)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  opt = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  _, opt = tx.update(zeros, opt, params)                  # step 0: lr 0
  updates, _ = tx.update(zeros, opt, params)              # step 1: peak lr 0.1
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["b"], np.zeros(2))


def test_schedule_warmup_peak_end():
  sched = optim.warmup_cosine(learning_rate=1e-3, warmup_steps=10, total_steps=110)
  np.testing.assert_allclose(
      [sched(0), sched(5), sched(10), sched(60), sched(110)],
      [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)
  with pytest.raises(ValueError):
    optim.warmup_cosine(learning_rate=1.0, warmup_steps=10, total_steps=10)
