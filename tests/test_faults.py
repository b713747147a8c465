"""Training survives faults and refuses to go on silently (pixelllm_jax/train/guards.py).

- kill -9 at 10+ random moments, several right after a step that started an asynchronous save:
  each restart resumes, and the final parameters and every logged loss equal an uninterrupted
  run's bitwise;
- SIGTERM (a preemption notice) saves a checkpoint and exits 0, and a rerun resumes exactly;
- a second trainer on the same model dir is refused, naming the first;
- a failed asynchronous save stops the run at once (not one interval later);
- a step with a non-finite loss or gradient leaves parameters and optimizer state unchanged and
  is counted; a run that keeps diverging stops, and no non-finite state is checkpointed.
"""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pixelllm_jax.train import checkpoint as ckpt, guards, trainer
from test_train_step import ToyIterator, ToyModel, partitioner_of, toy_batch, toy_optimizer
from xla_env import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, EVERY, KILLS = 80, 3, 10


def _env(cache_dir: str) -> dict:
  return {**os.environ, "XLA_FLAGS": xla_flags(2),
          "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _start(model_dir, env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, os.path.join(HERE, "fault_run.py"), str(model_dir),
                           str(STEPS), str(EVERY)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env)


def _step_of(line: str) -> int | None:
  if line.startswith("step "):
    return int(line.split()[1].split("/")[0])
  return None


def _run_to_end(model_dir, env) -> str:
  proc = _start(model_dir, env)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  return out


def _losses(model_dir) -> dict[int, float]:
  """step -> logged loss; a step logged again after a restart keeps its last value."""
  out = {}
  with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      out[row["step"]] = row["loss"]
  return out


def _params(model_dir) -> dict:
  with np.load(os.path.join(model_dir, "final_params.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults")
  env = _env(str(root / "jax_cache"))
  model_dir = root / "uninterrupted"
  _run_to_end(model_dir, env)
  return root, env, _losses(model_dir), _params(model_dir)


def _assert_same_run(model_dir, reference):
  _, _, ref_losses, ref_params = reference
  losses = _losses(model_dir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses == ref_losses  # bitwise: floats round-trip exactly through JSON
  params = _params(model_dir)
  assert params.keys() == ref_params.keys()
  for name in params:
    np.testing.assert_array_equal(params[name], ref_params[name], err_msg=name)


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_bitwise(reference):
  root, env, _, _ = reference
  model_dir = root / "killed"
  rng = random.Random(0)
  kills = during_save = 0
  while True:
    started = time.time()
    proc = _start(model_dir, env)
    lines, target = [], None
    # Half the kills right after a step that started an asynchronous save, half after a
    # random delay once training runs (mid-step, mid-save or mid-restore). Each life makes
    # at most ~6 steps of progress, so KILLS kills happen well before step STEPS.
    after_save = rng.random() < 0.5
    for line in proc.stdout if kills < KILLS else ():
      lines.append(line)
      step = _step_of(line)
      if step is None:
        continue
      target = step + rng.randint(1, 6) if target is None else target
      if after_save and step >= target and step % EVERY == 0 and step < STEPS:
        break
      if not after_save and step >= target - 3 and step < STEPS:
        time.sleep(rng.uniform(0.0, 0.3))
        break
    if kills < KILLS and proc.poll() is None:
      proc.kill()
      proc.wait()
      kills += 1
      # A save this life started and did not finish (Orbax writes into a tmp dir first).
      during_save += any(os.path.getmtime(path) >= started for path in glob.glob(
          str(model_dir / "checkpoints" / "*orbax-checkpoint-tmp*")))
      continue
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, ("".join(lines) + out)[-3000:]
    break
  print(json.dumps({"kills": kills, "kills_with_a_save_in_flight": during_save}))
  assert kills == KILLS and during_save >= 1
  _assert_same_run(model_dir, reference)


def test_sigterm_saves_and_exits_0_then_resumes_exactly(reference):
  root, env, _, _ = reference
  model_dir = root / "preempted"
  proc = _start(model_dir, env)
  for line in proc.stdout:
    if _step_of(line) == 10:
      proc.send_signal(signal.SIGTERM)
      break
  out = proc.stdout.read()
  assert proc.wait(timeout=120) == 0, out[-3000:]
  assert "Preempted (SIGTERM)" in out and "done preempted=True" in out
  stopped = int(out.split("done preempted=True step=")[1].split()[0])
  assert 10 <= stopped < STEPS
  manager = ckpt.make_manager(str(model_dir / "checkpoints"))
  assert manager.latest_step() == stopped  # saved at the preemption step, not the last interval
  manager.close()
  _run_to_end(model_dir, env)
  _assert_same_run(model_dir, reference)


def _train(model_dir, num_steps=4, **kw):
  kw = {"checkpoint_every": 2, "log_every": 1, **kw}
  return trainer.train(model_dir=str(model_dir), model=ToyModel(), num_steps=num_steps,
                       optimizer=toy_optimizer(), partitioner=partitioner_of(2, 1), **kw)


def test_a_second_trainer_on_the_same_model_dir_is_refused(tmp_path):
  with guards.ModelDirLock(str(tmp_path)):
    with pytest.raises(guards.ModelDirBusy, match=rf"in use by another training run \(pid {os.getpid()}"):
      _train(tmp_path, train_data=ToyIterator())
  assert not (tmp_path / "checkpoints").exists()
  result = _train(tmp_path, train_data=ToyIterator())  # released: the next run goes ahead
  assert int(result.state.step) == 4


def test_a_failed_asynchronous_save_stops_the_run_at_once(tmp_path, monkeypatch):
  """The save of step 10 fails in Orbax's background thread (a full disk): the run stops
  with the error before the next save is due (step 15), having kept the step-5 checkpoint."""
  from orbax.checkpoint._src.serialization import serialization

  real = serialization.async_serialize_from_host

  async def disk_full_at_step_10(rslices, tensorstore_spec, **kwargs):
    if "/10.orbax-checkpoint-tmp" in json.dumps(tensorstore_spec, default=str):
      raise OSError(28, "No space left on device")
    return await real(rslices, tensorstore_spec, **kwargs)

  class SlowAfterStep10(ToyIterator):
    """Half a second per step after the failing save starts, so that "at once" (before the
    next save is due) does not depend on how fast a loaded machine runs the toy steps."""

    def __next__(self):
      if self.i >= 10:
        time.sleep(0.5)
      return super().__next__()

  monkeypatch.setattr(serialization, "async_serialize_from_host", disk_full_at_step_10)
  with pytest.raises(guards.CheckpointSaveFailed, match="checkpoint of step 10 under"):
    _train(tmp_path, num_steps=40, checkpoint_every=5, train_data=SlowAfterStep10())
  logged = [json.loads(line)["step"] for line in open(tmp_path / "train" / "metrics.jsonl")]
  assert 10 <= max(logged) < 15, logged
  manager = ckpt.make_manager(str(tmp_path / "checkpoints"))
  assert manager.all_steps() == [5]
  manager.close()


def test_a_save_error_raised_by_orbax_is_reported_as_the_failed_save():
  """Orbax either logs a background failure or re-raises it from wait_until_finished;
  the second way also becomes CheckpointSaveFailed naming the step and the cause."""

  class RaisingManager:
    directory = "/ckpts"

    def wait_until_finished(self):
      raise OSError(28, "No space left on device")

  saves = guards.SaveMonitor(RaisingManager())
  saves.started(10)
  with pytest.raises(guards.CheckpointSaveFailed,
                     match=r"step 10 under /ckpts failed \(OSError: .*No space left"):
    saves.check(wait=True)
  saves.check(wait=True)  # reported once


class _NaNIterator(ToyIterator):
  """Toy batches whose point targets are NaN at the given positions (0-based)."""

  def __init__(self, nan_at, **kw):
    super().__init__(**kw)
    self.nan_at = set(nan_at)

  def __next__(self):
    position = self.i
    batch = super().__next__()
    if position in self.nan_at:
      batch = batch.replace(point_targets=np.full_like(batch.point_targets, np.nan))
    return batch


def test_a_nonfinite_step_leaves_the_state_unchanged_and_is_counted(tmp_path):
  clean = _train(tmp_path / "clean", num_steps=2, train_data=ToyIterator())
  hit = _train(tmp_path / "hit", num_steps=3, train_data=_NaNIterator(nan_at={2}))
  assert hit.nonfinite_steps == 1 and int(hit.state.step) == 3
  # Steps 1-2 equal the clean run's; step 3 (NaN targets) changed neither params nor moments.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(hit.state.params),
               jax.device_get(clean.state.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(hit.state.opt_state),
               jax.device_get(clean.state.opt_state))
  logged = [json.loads(l) for l in open(tmp_path / "hit" / "train" / "metrics.jsonl")]
  assert [row["nonfinite"] for row in logged] == [0.0, 0.0, 1.0]


def test_a_diverging_run_stops_and_checkpoints_nothing_nonfinite(tmp_path):
  with pytest.raises(guards.TrainingDiverged, match="3 consecutive steps"):
    _train(tmp_path, num_steps=20, checkpoint_every=4, max_nonfinite_steps=3,
           train_data=_NaNIterator(nan_at=range(5, 100)))
  manager = ckpt.make_manager(str(tmp_path / "checkpoints"))
  assert manager.all_steps() == [4]
  state, _ = ckpt.restore(manager, _abstract_state(), _shardings())
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
  manager.close()


def _spec():
  from pixelllm_jax.train import optim, state as state_lib
  model = ToyModel()
  tx = optim.with_frozen(toy_optimizer(), model.trainable)
  return state_lib.state_spec(model, toy_batch(0), tx, partitioner_of(2, 1))


def _abstract_state():
  return _spec().abstract


def _shardings():
  return _spec().shardings
