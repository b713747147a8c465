"""Orbax round trips: train + iterator state onto another mesh, params only, bare params."""
import jax
import numpy as np
import pytest

from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.train import checkpoint as ckpt, state as state_lib, trainer
from test_train_step import ToyModel, partitioner_of, sharded_state, toy_batch, toy_optimizer

FROZEN = ("sam", "t5")  # SAM and the LM base frozen, its LoRA trains: opt state has holes


def _trained_state(partitioner, frozen=()):
  model = ToyModel(frozen)
  state, shardings, tx = sharded_state(model, toy_optimizer(), partitioner)
  step = trainer.make_train_step(model, tx, partitioner=partitioner, state_shardings=shardings)
  for i in range(2):
    state, _ = step(state, partitioner.shard_batch(toy_batch(i)), jax.random.key(1))
  return state, shardings


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def _save_steps(directory, state, steps=(1, 2, 3)):
  manager = ckpt.make_manager(str(directory), max_to_keep=2)
  for step in steps:
    ckpt.save(manager, step, state, {"position": 10 * step, "name": "toy"})
  manager.wait_until_finished()
  manager.close()


def test_state_and_iterator_round_trip_onto_another_mesh(tmp_path):
  state, _ = _trained_state(partitioner_of(4, 2), FROZEN)
  saved = jax.device_get(state)
  _save_steps(tmp_path, state)

  # A fresh manager (a restarted job) restores onto a different mesh.
  _, other_shardings, _ = sharded_state(ToyModel(FROZEN), toy_optimizer(), partitioner_of(2, 4))
  manager = ckpt.make_manager(str(tmp_path))
  assert manager.all_steps() == [2, 3]
  restored, data_state = ckpt.restore(manager, state, other_shardings)
  assert data_state == {"position": 30, "name": "toy"}
  assert int(restored.step) == 2
  _assert_trees_equal(restored.params, saved.params)
  _assert_trees_equal(restored.opt_state, saved.opt_state)
  kernel = restored.params["t5"]["mlp_in"]["kernel"]
  assert kernel.sharding == other_shardings.params["t5"]["mlp_in"]["kernel"]
  assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 1, "model": 4}
  older, data_state = ckpt.restore(manager, state, other_shardings, step=2)
  assert data_state["position"] == 20
  manager.close()


def test_params_only_restore_onto_another_mesh_and_rules(tmp_path):
  state, _ = _trained_state(partitioner_of(4, 2), FROZEN)
  saved = jax.device_get(state.params)
  _save_steps(tmp_path, state)
  # Evaluation: no optimizer, another mesh (data 2 x fsdp 2 x model 2) and rule set.
  model, partitioner = ToyModel(FROZEN), Partitioner((2, 2, 2), "fsdp_tp")
  boxed, shardings = partitioner.abstract_params(state_lib.param_init_fn(model, toy_batch(0)))
  step, params = partitioner.restore_params(str(tmp_path), boxed)
  assert step == 3
  _assert_trees_equal(params, saved)
  embedding = params["t5"]["embedding"]   # ('vocab', 'embed') -> ('model', 'fsdp')
  assert embedding.sharding == shardings["t5"]["embedding"]
  assert embedding.sharding.spec == jax.sharding.PartitionSpec("model", "fsdp")
  assert embedding.addressable_shards[0].data.shape == (embedding.shape[0] // 2,
                                                        embedding.shape[1] // 2)
  step, _ = partitioner.restore_params(str(tmp_path), boxed, step=2)
  assert step == 2
  with pytest.raises(FileNotFoundError, match="at step 7"):
    partitioner.restore_params(str(tmp_path), boxed, step=7)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    partitioner.restore_params(str(tmp_path / "empty"), boxed)
  # A model whose parameters differ is refused, naming them.
  wrong = jax.tree.map(lambda x: x, boxed)
  wrong["t5"]["embedding"] = wrong["t5"]["embedding"].replace_boxed(
      jax.ShapeDtypeStruct((3, 8), np.float32))
  with pytest.raises(ValueError, match="t5/embedding: stored"):
    partitioner.restore_params(str(tmp_path), wrong)


def test_restore_from_empty_directory_is_none(tmp_path):
  state, shardings = _trained_state(partitioner_of(1, 1))
  assert ckpt.restore(ckpt.make_manager(str(tmp_path)), state, shardings) is None


def test_bare_params_partial_load(tmp_path):
  state, shardings = _trained_state(partitioner_of(4, 2))
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


def test_init_from_a_previous_runs_checkpoints(tmp_path):
  """The paper's stages chain: `load_params` reads a training run's latest parameters (from
  its model dir or its checkpoints/ folder), not its optimizer state, onto this run's mesh."""
  state, _ = _trained_state(partitioner_of(4, 2), FROZEN)
  saved = jax.device_get(state.params)
  _save_steps(tmp_path / "run" / "checkpoints", state, steps=(1, 2))
  fresh, shardings = _trained_state(partitioner_of(2, 4))  # all trained: other values
  assert not np.array_equal(jax.device_get(fresh.params["t5"]["mlp_in"]["kernel"]),
                            saved["t5"]["mlp_in"]["kernel"])
  for source in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
    loaded = ckpt.load_params(str(source), fresh.params, shardings.params)
    _assert_trees_equal(loaded, saved)
    kernel = loaded["t5"]["mlp_in"]["kernel"]
    assert kernel.sharding == shardings.params["t5"]["mlp_in"]["kernel"]
