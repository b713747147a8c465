"""Orbax round trips: train state + iterator state, restore onto another mesh, bare params."""
import jax
import numpy as np
import pytest

from pixelllm_jax.train import checkpoint as ckpt, optim, state as state_lib, trainer
from test_train_step import ToyModel, toy_batch, toy_loss, toy_optimizer, mesh_of


def _trained_state(mesh, tx=None):
  model, tx = ToyModel(), tx or toy_optimizer()
  state, shardings = state_lib.create_sharded_state(model, toy_batch(0), tx, mesh,
                                                    jax.random.key(0))
  step = trainer.make_train_step(model, toy_loss, tx, mesh=mesh, state_shardings=shardings)
  for i in range(2):
    state, _ = step(state, trainer.shard_batch(toy_batch(i), mesh), jax.random.key(1))
  return state, shardings


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_state_and_iterator_round_trip_onto_another_mesh(tmp_path):
  predicate = optim.Trainable(frozen_prefixes=("sam",), freeze_lm_base=True)
  state, _ = _trained_state(mesh_of(4, 2), toy_optimizer(predicate))
  saved = jax.device_get(state)
  manager = ckpt.make_manager(str(tmp_path), max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(manager, step, state, {"position": 10 * step, "name": "toy"})
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  manager.close()

  # A fresh manager (a restarted job) restores onto a different mesh.
  other_mesh = mesh_of(2, 4)
  _, other_shardings = state_lib.create_sharded_state(
      ToyModel(), toy_batch(0), toy_optimizer(predicate), other_mesh, jax.random.key(5))
  manager = ckpt.make_manager(str(tmp_path))
  restored, data_state = ckpt.restore(manager, state, other_shardings)
  assert data_state == {"position": 30, "name": "toy"}
  assert int(restored.step) == 2
  _assert_trees_equal(restored.params, saved.params)
  _assert_trees_equal(restored.opt_state, saved.opt_state)
  kernel = restored.params["t5"]["mlp_in"]["kernel"]
  assert kernel.sharding == other_shardings.params["t5"]["mlp_in"]["kernel"]
  assert kernel.sharding.mesh.shape == {"data": 2, "model": 4}
  older, data_state = ckpt.restore(manager, state, other_shardings, step=2)
  assert data_state["position"] == 20
  manager.close()


def test_restore_from_empty_directory_is_none(tmp_path):
  state, shardings = _trained_state(mesh_of(1, 1))
  assert ckpt.restore(ckpt.make_manager(str(tmp_path)), state, shardings) is None


def test_bare_params_partial_load(tmp_path):
  state, shardings = _trained_state(mesh_of(4, 2))
  params = jax.device_get(state.params)
  imported = {"t5": jax.tree.map(lambda x: x + 1.0, params["t5"])}
  ckpt.save_params(str(tmp_path / "imported"), imported)
  loaded = ckpt.load_params(str(tmp_path / "imported"), state.params, shardings.params)
  _assert_trees_equal(loaded["t5"], imported["t5"])
  _assert_trees_equal(loaded["logits"], params["logits"])
  assert loaded["t5"]["mlp_in"]["kernel"].sharding == shardings.params["t5"]["mlp_in"]["kernel"]

  bad = {"t5": {"embedding": np.zeros((3, 3), np.float32)}}
  ckpt.save_params(str(tmp_path / "bad_shape"), bad)
  with pytest.raises(ValueError, match="t5/embedding has shape"):
    ckpt.load_params(str(tmp_path / "bad_shape"), state.params, shardings.params)
  ckpt.save_params(str(tmp_path / "unknown"), {"nope": {"kernel": np.zeros(2, np.float32)}})
  with pytest.raises(ValueError, match="not in the model"):
    ckpt.load_params(str(tmp_path / "unknown"), state.params, shardings.params)
