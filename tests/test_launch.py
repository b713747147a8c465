"""launch/: sweep definitions, the local executor (a real 2 x 2 sweep of the tiny model with a
unit killed mid-training and the rerun that resumes it), the report, the xmanager dry run."""
import csv
import dataclasses
import enum
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from pixelllm_jax.data.world import generate
from pixelllm_jax.launch import local, report, sweep, xm_executor
from xla_env import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_product_and_zip_name_units_after_their_values():
  units = sweep.product(sweep.axis("lr", "make_optimizer.learning_rate", [1e-3, 3e-4]),
                        sweep.axis("seed", "train.seed", [0, 1]))
  assert [u.name for u in units] == ["lr=0.001,seed=0", "lr=0.001,seed=1",
                                     "lr=0.0003,seed=0", "lr=0.0003,seed=1"]
  assert units[2].bindings == {"make_optimizer.learning_rate": 3e-4, "train.seed": 0}
  zipped = sweep.zip_(sweep.axis("lr", "a.lr", [1, 2]), sweep.axis("wu", "a.warmup", [10, 20]))
  assert [(u.name, dict(u.bindings)) for u in zipped] == [
      ("lr=1,wu=10", {"a.lr": 1, "a.warmup": 10}), ("lr=2,wu=20", {"a.lr": 2, "a.warmup": 20})]
  with pytest.raises(ValueError, match="one length"):
    sweep.zip_(sweep.axis("a", "x", [1, 2]), sweep.axis("b", "y", [1]))
  with pytest.raises(ValueError, match="share names"):
    sweep.Sweep("s", ("runs/demo.gin",), units=sweep.product(sweep.axis("a", "x", [1, 1])))
  with pytest.raises(ValueError, match="MODEL_DIR is set by the launcher"):
    sweep.Sweep("s", ("runs/demo.gin",), units=sweep.product(sweep.axis("d", "MODEL_DIR", ["x"])))


def test_values_are_written_as_gin_literals():
  assert sweep.gin_literal("data/world") == "'data/world'"
  assert sweep.gin_literal((1, -1, 1)) == "(1, -1, 1)"
  assert sweep.gin_literal(("refer",)) == "('refer',)"
  assert sweep.gin_literal(sweep.Gin("@PixelLLMModel()")) == "@PixelLLMModel()"
  assert sweep.gin_literal(None) == "None" and sweep.gin_literal(True) == "True"
  with pytest.raises(TypeError, match="Gin"):
    sweep.gin_literal(object())
  s = sweep.Sweep("s", ("runs/demo.gin",), bindings={"TRAIN_STEPS": 5},
                  eval_bindings={"evaluate.tasks": ("refer",)},
                  units=sweep.product(sweep.axis("seed", "train.seed", [3])), evaluate=True)
  command = local.unit_command(s, s.units[0], "/r/seed=3")
  assert command[:5] == ["python", "-m", "pixelllm_jax.launch.unit", "--model_dir=/r/seed=3",
                         "--evaluate"]
  assert "--eval_arg=--gin.evaluate.tasks=('refer',)" in command
  assert command[command.index("--") + 1:] == [
      "--gin_file=runs/demo.gin", "--gin.MODEL_DIR='/r/seed=3'", "--gin.TRAIN_STEPS=5",
      "--gin.train.seed=3"]


def _write_unit(root, name, state, step=None, metrics=None, bindings=None):
  unit = root / name
  (unit / "train").mkdir(parents=True)
  (unit / "status.json").write_text(json.dumps(
      {"unit": name, "state": state, "bindings": bindings or {}, "message": "boom"}))
  if step is not None:
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, step + 1)]
    (unit / "train" / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 9")
  if metrics is not None:
    (unit / "metrics.json").write_text(json.dumps(metrics))


def test_the_report_reads_the_sweep_folder_while_it_runs(tmp_path):
  _write_unit(tmp_path, "seed=0", "done", 4, {"refer_p@0.5": 0.5, "note": "text"}, {"s": 0})
  _write_unit(tmp_path, "seed=1", "training", 2, None, {"s": 1})
  _write_unit(tmp_path, "seed=2", "failed", None, None, {"s": 2})
  rows = report.write(str(tmp_path))
  assert [(r["unit"], r["state"], r["step"]) for r in rows] == [
      ("seed=0", "done", 4), ("seed=1", "training", 2), ("seed=2", "failed", "")]
  with open(tmp_path / "report.csv") as f:
    table = list(csv.DictReader(f))
  assert table[0]["metric:refer_p@0.5"] == "0.5" and table[1]["metric:refer_p@0.5"] == ""
  assert table[2]["message"] == "boom" and table[0]["s"] == "0"
  text = (tmp_path / "report.txt").read_text()
  assert "refer_p@0.5" in text and "1 done, 1 failed, 1 training" in text


def test_xm_dry_run_prints_every_job_without_xmanager():
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "refcoco_t5_xl_lr.py"), "--executor=xm",
       "--dry_run", "--root=/gcs/b/sweeps/lr", "--data_dir=/gcs/b/data", "--ckpt_dir=/gcs/b/c"],
      capture_output=True, text=True, cwd=REPO, check=True, timeout=120).stdout
  assert "'refcoco_t5_xl_lr': 3 jobs (dry run, nothing launched)" in out
  assert out.count("executor: Vertex (H100 8)") == 3
  assert "--model_dir=/gcs/b/sweeps/lr/lr=5e-05 --evaluate -- --gin_file=runs/refcoco_t5_xl.gin" \
      in out
  assert "'--gin.INIT_CHECKPOINT='\"'\"'/gcs/b/c/pixelllm_t5_xl_init'\"'\"''" in out
  with pytest.raises(ModuleNotFoundError):  # the dry run did not need it
    __import__("xmanager")


def test_xm_requirements_name_tpu_topologies_and_gpu_counts():
  resource_type = enum.Enum("ResourceType", ["A100", "TPU_V4", "TPU_V5E"])
  fake = types.SimpleNamespace(ResourceType=resource_type, JobRequirements=lambda **kw: kw)
  assert xm_executor.requirements(fake, sweep.Resources("TPU_V5E", "4x4")) == {"TPU_V5E": "4x4"}
  assert xm_executor.requirements(fake, sweep.Resources("a100", "8")) == {"A100": 8}
  with pytest.raises(ValueError, match="no accelerator 'TPU_V9'"):
    xm_executor.requirements(fake, sweep.Resources("TPU_V9", "2x2"))


STEPS, KILL_AFTER = 60, 10


def _tiny_sweep(world):
  return sweep.Sweep(
      name="tiny",
      gin_files=("runs/demo.gin",),
      # One task (one training program to compile) and one layer per tower (compiles faster).
      bindings={"WORLD_DIR": world, "TRAIN_STEPS": STEPS, "BATCH_SIZE": 8,
                "train_data.mixture": (("refer", 1.0),), "EVA02Config.depth": 1,
                "SamViTConfig.depth": 1, "SamViTConfig.global_blocks": (0,),
                "PromptExtractorConfig.depth": 1, "T5Config.num_encoder_layers": 1,
                "T5Config.num_decoder_layers": 1, "LocHeadConfig.depth": 2,
                # No head that refer does not read (nor the wider SAM the mask head needs).
                "PixelLLMConfig.mask_head": None, "PixelLLMConfig.box_head": None,
                "SamViTConfig.out_channels": 32,
                "train.checkpoint_every": KILL_AFTER, "train.log_every": 5,
                "make_optimizer.warmup_steps": 5},
      eval_bindings={"evaluate.tasks": ("refer",), "evaluate.num_visualizations": 0,
                     "evaluate.batch_size": 8},
      # Neither axis changes the compiled programs: the first unit's compilations serve all.
      units=sweep.product(sweep.axis("seed", "train.seed", [0, 1]),
                          sweep.axis("data", "train_data.seed", [0, 1])),
      evaluate=True)


def _when_checkpointed(unit_dir, step, action, deadline):
  """Calls action(status) once the unit trains with its step-`step` checkpoint committed."""
  while time.time() < deadline:
    status = local.read_status(str(unit_dir / "status.json")) or {}
    if status.get("state") == "training" and (
        unit_dir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists():
      action(status)
      return
    time.sleep(0.02)
  raise AssertionError(f"{unit_dir}: no committed checkpoint of step {step} in time")


def _in_background(*args):
  thread = threading.Thread(target=_when_checkpointed, args=(*args, time.time() + 600))
  thread.start()
  return thread


def _resumed_steps(log: str) -> list[int]:
  return [int(part.split("at step ")[1].split()[0]) for part in log.split("Resumed from")[1:]]


@pytest.mark.slow
def test_a_2x2_sweep_runs_survives_a_failed_unit_and_resumes_it(tmp_path, monkeypatch):
  """Run 1: two units at a time; one unit's training is killed (SIGKILL) after its step-10
  checkpoint: it is 'failed', the others finish and evaluate. Run 2: the three finished units
  are skipped, the failed one resumes from its checkpoint; SIGTERM to the launcher preempts it
  (a checkpoint is saved). Run 3 resumes it again and finishes."""
  # The launcher's SIGTERM handler needs the main thread (pytest and xdist run tests there).
  assert threading.current_thread() is threading.main_thread()
  world, root = str(tmp_path / "world"), tmp_path / "sweep"
  generate.generate_world(world, num_train=40, num_val=2, num_test=4, seed=5)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  monkeypatch.setenv("XLA_FLAGS", xla_flags(1))
  monkeypatch.chdir(REPO)
  the_sweep, victim = _tiny_sweep(world), "seed=1,data=0"
  lines: list[str] = []
  executor = local.LocalExecutor(str(root), parallel=2, poll_seconds=0.1, log=lines.append)

  killer = _in_background(root / victim, KILL_AFTER,
                          lambda status: os.kill(status["pid"], signal.SIGKILL))
  states = executor.run(the_sweep)
  killer.join()
  assert states == {"seed=0,data=0": "done", "seed=0,data=1": "done", victim: "failed",
                    "seed=1,data=1": "done"}, "\n".join(lines)
  assert all(": started" in line for line in lines[:2]), lines  # two at a time
  failed = json.loads((root / victim / "status.json").read_text())
  assert failed["stage"] == "training" and failed["returncode"] == -signal.SIGKILL
  assert failed["message"].startswith("killed by SIGKILL")
  rows = {r["unit"]: r for r in report.collect(str(root))}
  assert rows[victim]["state"] == "failed" and KILL_AFTER <= rows[victim]["step"] < STEPS
  assert all(rows[u]["step"] == STEPS and "metric:refer_p@0.5" in rows[u]
             for u in rows if u != victim)

  lines.clear()
  preempt = _in_background(root / victim, 2 * KILL_AFTER,
                           lambda status: os.kill(os.getpid(), signal.SIGTERM))
  states = executor.run(the_sweep)  # finished units skipped, the killed one resumed, preempted
  preempt.join()
  assert sum("done, skipped" in line for line in lines) == 3
  assert states[victim] == "preempted", "\n".join(lines)
  assert any("SIGTERM: stopping the running units" in line for line in lines)
  saved = json.loads((root / victim / "train_summary.json").read_text())
  assert not saved["finished"] and 2 * KILL_AFTER <= saved["step"] < STEPS

  lines.clear()
  states = executor.run(the_sweep)  # resumed again, to the end
  assert set(states.values()) == {"done"}, "\n".join(lines)
  log = (root / victim / "launch.log").read_text()
  assert log.count("==== attempt") == 3
  assert _resumed_steps(log) == [KILL_AFTER, saved["step"]]  # where the kill and SIGTERM left it
  rows = {r["unit"]: r for r in report.collect(str(root))}
  assert rows[victim]["step"] == STEPS and rows[victim]["metric:refer_p@0.5"] >= 0
  assert json.loads((root / victim / "train_summary.json").read_text())["finished"]
  with open(root / "report.csv") as f:
    assert [r["state"] for r in csv.DictReader(f)] == ["done"] * 4

  changed = _tiny_sweep(world)
  changed = dataclasses.replace(changed, bindings={**changed.bindings, "TRAIN_STEPS": STEPS + 10})
  with pytest.raises(ValueError, match="were run with other arguments"):
    executor.run(changed)


def test_a_failed_unit_records_the_exception_it_ended_with():
  from pixelllm_jax.launch import unit  # pylint: disable=import-outside-toplevel
  output = ["step 10/60  loss 3.1", "Error-free line", "Traceback (most recent call last):",
            '  File "x.py", line 1, in <module>',
            "pixelllm_jax.train.run_record.RunConfigChanged: resuming changed:",
            "  train_data.batch_size: 16 -> 8", "Undo the change, or pass --allow_config_change"]
  assert unit._error_line(output) == (
      "pixelllm_jax.train.run_record.RunConfigChanged: resuming changed: / "
      "  train_data.batch_size: 16 -> 8 / Undo the change, or pass --allow_config_change")
  assert unit._error_line(["step 3/9", "step 4/9"]) == "step 4/9"


def test_one_launcher_per_sweep_folder(tmp_path):
  import fcntl  # pylint: disable=import-outside-toplevel
  s = sweep.Sweep("s", ("runs/demo.gin",), units=sweep.product(sweep.axis("seed", "x", [0])))
  with open(tmp_path / "launcher.lock", "a+") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(RuntimeError, match="another launcher is running the sweep"):
      local.LocalExecutor(str(tmp_path)).run(s)
  assert not (tmp_path / "seed=0").exists()
