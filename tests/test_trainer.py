"""The training loop: exact resume, init checkpoints, TensorBoard events, the gin CLI."""
import os

import gin
import jax
import numpy as np
import pytest
from absl import flags

from pixelllm_jax import cli
from pixelllm_jax.train import checkpoint as ckpt, main, trainer
from test_train_step import ToyIterator, ToyModel, partitioner_of, toy_optimizer

MESH = (4, 2)


def _train(model_dir, num_steps, **kw):
  kw = {"checkpoint_every": 3, "log_every": 2, "keep_checkpoints": 2, **kw}
  return trainer.train(
      model_dir=str(model_dir), model=ToyModel(), train_data=ToyIterator(seed=7),
      num_steps=num_steps, optimizer=toy_optimizer(total_steps=6),
      partitioner=partitioner_of(*MESH), seed=3, **kw)


def test_resume_equals_uninterrupted_run(tmp_path):
  full = _train(tmp_path / "full", 6)
  first = _train(tmp_path / "split", 3)
  assert int(first.state.step) == 3
  resumed = _train(tmp_path / "split", 6)   # a restarted job: new iterator, new objects
  assert int(resumed.state.step) == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
               jax.device_get(full.state.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.opt_state),
               jax.device_get(full.state.opt_state))
  assert resumed.metrics["loss"] == full.metrics["loss"]
  assert set(full.metrics) == {"loss", "caption_loss", "point_loss", "nonfinite",
                               "steps_per_second", "examples_per_second"}
  assert full.train_seconds > 0

  # Checkpoints at 3 and 6 hold the iterator position after that many batches.
  manager = ckpt.make_manager(str(tmp_path / "split" / "checkpoints"))
  assert manager.all_steps() == [3, 6]
  _, data_state = ckpt.restore(manager, resumed.state, jax.tree.map(lambda x: x.sharding,
                                                                   resumed.state))
  assert data_state == {"position": 6}
  manager.close()
  events = os.listdir(tmp_path / "full" / "train")
  assert any(name.startswith("events.out.tfevents") for name in events)

  # Finished runs resume to a no-op.
  again = _train(tmp_path / "split", 6)
  assert int(again.state.step) == 6


def test_init_checkpoint_loads_params_only(tmp_path):
  source = _train(tmp_path / "source", 2, checkpoint_every=100)
  ckpt.save_params(str(tmp_path / "imported"), {"t5": jax.device_get(source.state.params["t5"])})
  # Zero steps: the returned state is the init with the imported 't5' subtree.
  fresh = _train(tmp_path / "fresh", 0, init_checkpoint=str(tmp_path / "imported"))
  base = _train(tmp_path / "base", 0)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(fresh.state.params["t5"]),
               jax.device_get(source.state.params["t5"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(fresh.state.params["logits"]),
               jax.device_get(base.state.params["logits"]))
  assert int(fresh.state.step) == 0

  # Several, in order: a later checkpoint's leaves win, the others' stay.
  ckpt.save_params(str(tmp_path / "logits"), {"logits": jax.device_get(source.state.params["logits"]),
                                               "t5": jax.device_get(base.state.params["t5"])})
  both = _train(tmp_path / "both", 0, init_checkpoint=(str(tmp_path / "imported"),
                                                       str(tmp_path / "logits")))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(both.state.params),
               {**jax.device_get(base.state.params),
                "logits": jax.device_get(source.state.params["logits"])})
  first_only = _train(tmp_path / "first_only", 0, init_checkpoint=[str(tmp_path / "logits"),
                                                                   str(tmp_path / "imported")])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(first_only.state.params["t5"]),
               jax.device_get(source.state.params["t5"]))


TOY_GIN = """
import test_train_step

MODEL_DIR = %gin.REQUIRED
TRAIN_STEPS = %gin.REQUIRED

train.model_dir = %MODEL_DIR
train.num_steps = %TRAIN_STEPS
train.model = @ToyModel()
train.train_data = @ToyIterator()
train.optimizer = @make_optimizer()
train.partitioner = @Partitioner()
train.log_every = 1
train.checkpoint_every = 100

ToyModel.frozen = ('sam',)
Partitioner.mesh_shape = (-1, 1, 2)
Partitioner.rules = 'fsdp_tp'
make_optimizer.learning_rate = 1e-2
make_optimizer.warmup_steps = 1
make_optimizer.total_steps = %TRAIN_STEPS
make_optimizer.weight_decay = 0.0
"""


@pytest.fixture
def gin_toy():
  """Registers the toy pieces with gin for one test and clears the config after."""
  import test_train_step as toy

  registered = [gin.external_configurable(obj, module="test_train_step")
                for obj in (toy.ToyModel, toy.ToyIterator)]
  yield registered
  gin.clear_config()


def test_cli_parses_gin_file_and_bindings(tmp_path, gin_toy):
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "toy.gin").write_text(TOY_GIN)
  model_dir = tmp_path / "run"
  argv = ["train", "--gin_file=toy.gin", f"--gin_search_paths={tmp_path / 'configs'}",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2",
          "--gin_bindings=ToyIterator.seed = 5"]
  assert cli.rewrite_gin_args(argv)[3] == f"--gin_bindings=MODEL_DIR = '{model_dir}'"
  try:
    rest = cli.parse_flags(argv)
    result = main.run(rest)
  finally:
    flags.FLAGS.unparse_flags()
    flags.FLAGS.mark_as_parsed()
  assert int(result.state.step) == 2
  # gin wraps long bindings ("NAME = \\\n    'value'"): compare with whitespace collapsed.
  config = " ".join((model_dir / "config.gin").read_text().replace("\\\n", " ").split())
  assert "TRAIN_STEPS = 2" in config and "train.num_steps = %TRAIN_STEPS" in config
  assert "ToyIterator.seed = 5" in config
  assert "ToyModel.frozen = ('sam',)" in config and "Partitioner.rules = 'fsdp_tp'" in config
  assert f"MODEL_DIR = '{model_dir}'" in config
  assert os.path.isdir(model_dir / "checkpoints" / "2")


def test_logging_window_weighs_metrics_by_their_token_counts():
  """A step of another task (no text tokens) must not dilute the text loss."""
  import jax.numpy as jnp
  window = trainer._Window()
  window.add({"loss": jnp.float32(1.0), "text_loss": jnp.float32(2.0),
              "count/text_loss": jnp.float32(10.0)}, examples=4)
  window.add({"loss": jnp.float32(3.0), "text_loss": jnp.float32(0.0),
              "count/text_loss": jnp.float32(0.0)}, examples=4)
  window.add({"loss": jnp.float32(2.0), "text_loss": jnp.float32(5.0),
              "count/text_loss": jnp.float32(30.0)}, examples=4)
  out = window.close()
  assert out["loss"] == pytest.approx(2.0)                        # per step
  assert out["text_loss"] == pytest.approx((2 * 10 + 5 * 30) / 40)  # per token
  assert out["count/text_loss"] == pytest.approx(40 / 3)
  empty = trainer._Window()
  empty.add({"loss": jnp.float32(1.0), "text_loss": jnp.float32(0.0),
             "count/text_loss": jnp.float32(0.0)}, examples=4)
  assert "text_loss" not in empty.close()  # nothing to average: left out, not 0
