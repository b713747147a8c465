"""Several processes on this machine (jax.distributed over localhost, gloo collectives).

- Two processes x 4 fake CPU devices train the toy model with the same losses and parameters
  as one process with 8 devices.
- When one process dies, the others end with an error naming the cause within the heartbeat
  timeout (10 s here; `--heartbeat_timeout_seconds`, default 60) plus a few seconds: no hang.
- Two processes x 4 fake CPU devices evaluate a tiny PixelLLM checkpoint through the command
  line with the same metrics, predictions and pictures as one process with 8 devices, every
  slot of the split counted once (none of the last batch's padding).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from xla_env import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


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


def _run_cli(command, args, devices, num_processes=1):
  """`python -m pixelllm_jax.<command> ARGS` in `num_processes` processes (jax.distributed on
  localhost when > 1) with `devices` fake CPU devices each; returns their outputs."""
  port = portpicker.pick_unused_port()
  multi = lambda i: ([f"--coordinator_address=localhost:{port}",  # noqa: E731
                      f"--process_count={num_processes}", f"--process_index={i}",
                      "--heartbeat_timeout_seconds=10"] if num_processes > 1 else [])
  procs = [subprocess.Popen([sys.executable, "-m", f"pixelllm_jax.{command}", *args, *multi(i)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(devices))
           for i in range(num_processes)]
  try:
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"{command} process {i}:\n{out[-3000:]}"
  return outs


def _eval_outputs(model_dir):
  """metrics.json less its timings, and every file the step wrote under eval/<step>/
  (predictions and pictures per split), by path below it."""
  with open(os.path.join(model_dir, "metrics.json")) as f:
    metrics = json.load(f)
  timings = {k: metrics.pop(k) for k in ("eval_seconds", "train_seconds")}
  assert timings["eval_seconds"] > 0
  step_dir = os.path.join(model_dir, "eval", str(metrics["checkpoint_step"]))
  files = {}
  for folder, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(folder, name)
      if name != "metrics.json":  # holds eval_seconds; compared above
        with open(path, "rb") as f:
          files[os.path.relpath(path, step_dir)] = f.read()
  return metrics, files


@pytest.mark.slow
def test_two_processes_evaluate_like_one_with_all_the_devices(tmp_path):
  from pixelllm_jax.data.world import generate  # pylint: disable=import-outside-toplevel
  world, one, two = tmp_path / "world", tmp_path / "one", tmp_path / "two"
  # 11 test scenes, a global eval batch of 8: every task's last batch is partly padding.
  counts = generate.generate_world(str(world), num_train=16, num_val=2, num_test=11,
                                   seed=3)["counts"]["test"]
  args = ["--gin_file=runs/demo.gin", f"--gin.WORLD_DIR='{world}'"]
  # The checkpoint: the trainer's step 0 (the tiny model's initial parameters). Compiling a
  # train step alone takes about a minute on the 2-core machine, more than this test's budget;
  # evaluation reads a step-0 checkpoint exactly as it reads any other.
  _run_cli("train", [*args, f"--gin.MODEL_DIR='{one}'", "--gin.TRAIN_STEPS=0",
                     "--gin.make_optimizer.total_steps=1000"], devices=1)
  shutil.copytree(one, two)
  # Two tasks, the two kinds of evaluation call: teacher forced (refer; trace and refseg read
  # alike) and generated (densecap: detected, then decoded as caption and loca decode).
  evaluate = [*args, "--gin.evaluate.batch_size=8", "--gin.evaluate.num_visualizations=2",
              "--gin.evaluate.tasks=('refer', 'densecap')"]
  _run_cli("eval", [*evaluate, f"--gin.MODEL_DIR='{one}'"], devices=8)
  outs = _run_cli("eval", [*evaluate, f"--gin.MODEL_DIR='{two}'"], devices=4, num_processes=2)
  assert '"eval_seconds"' in outs[0] and '"eval_seconds"' not in outs[1]  # process 0 reports

  metrics, files = _eval_outputs(one)
  print(json.dumps(metrics))
  assert metrics["checkpoint_step"] == 0
  # Every slot of the split exactly once (padding rows never count).
  assert metrics["densecap_images"] == counts["images"]
  assert metrics["refer_count"] == counts["expressions"]
  assert {"test/refer_00.png", "test/refer_01.png", "test/densecap_00.png",
          "test/densecap_01.png"} <= set(files)
  two_metrics, two_files = _eval_outputs(two)
  assert two_metrics == metrics
  assert sorted(two_files) == sorted(files)
  for name in files:
    assert two_files[name] == files[name], name
