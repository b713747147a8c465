"""Several processes on this machine (jax.distributed over localhost, gloo collectives).

- Two processes x 4 fake CPU devices train the toy model with the same losses and parameters
  as one process with 8 devices.
- When one process dies, the others end with an error naming the cause within the heartbeat
  timeout (10 s here; `--heartbeat_timeout_seconds`, default 60) plus a few seconds: no hang.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from xla_env import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))


def _env(devices: int) -> dict:
  return {**os.environ, "XLA_FLAGS": xla_flags(devices),
          "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _start(process_id, num_processes, port, model_dir, steps, devices):
  return subprocess.Popen(
      [sys.executable, os.path.join(HERE, "mp_worker.py"), str(process_id), str(num_processes),
       str(port), str(model_dir), str(steps)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(devices))


def _losses(model_dir):
  with open(os.path.join(model_dir, "train", "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow
def test_two_processes_train_like_one_with_all_the_devices(tmp_path):
  steps = 6
  one = _start(0, 1, 0, tmp_path / "one", steps, devices=8)
  out, _ = one.communicate(timeout=300)
  assert one.returncode == 0, out[-3000:]
  port = portpicker.pick_unused_port()
  procs = [_start(i, 2, port, tmp_path / "two", steps, devices=4) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  assert "process 1 of 2: 4 local devices, 8 in all" in outs[1]
  np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-6)
  with np.load(tmp_path / "one" / "final_params.npz") as a, \
      np.load(tmp_path / "two" / "final_params.npz") as b:
    assert a.files == b.files
    for name in a.files:
      np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_when_a_process_dies_the_others_stop_with_an_error(tmp_path, victim):
  port = portpicker.pick_unused_port()
  procs = [_start(i, 2, port, tmp_path / "run", 100000, devices=2) for i in range(2)]
  survivor = procs[1 - victim]
  for line in survivor.stdout:  # wait until they train
    if line.startswith("step 20/"):
      break
  procs[victim].kill()
  killed_at = time.time()
  out, _ = survivor.communicate(timeout=120)
  waited = time.time() - killed_at
  print(json.dumps({"victim": victim, "survivor_exit": survivor.returncode,
                    "seconds_to_stop": round(waited, 1)}))
  assert survivor.returncode != 0
  assert waited < 10 + 20
  assert "another task died" in out or "unhealthy" in out, out[-3000:]
