"""The evaluation job (pixelllm_jax/eval/job.py) on a tiny generated world and fake runs.

One `Evaluator` of the tiny model (built from the evaluation gin alone: no training
template, no optimizer) is compiled once and serves every test and every step. A "run" is
a model dir whose checkpoints hold parameters only (random, seeded per step, so every
step scores differently), written with the trainer's own `checkpoint.make_manager`;
the follow test writes them from a thread while the job runs.
"""
import dataclasses
import json
import math
import os
import threading
import time

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from pixelllm_jax import cli, gin_checks, tasks
from pixelllm_jax.data.world import generate
from pixelllm_jax.eval import evaluator as evaluator_lib
from pixelllm_jax.eval import job, outputs, summary
from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.train import checkpoint, run_record

SPLITS = {"trace": ("test",), "refer": ("val", "test")}
EVAL_KW = dict(splits=SPLITS, batch_size=8, num_slots=4, num_prompts=4, num_visualizations=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_job")
  counts = generate.generate_world(str(root / "world"), num_train=2, num_val=2, num_test=3,
                                   seed=3)["counts"]
  gin.clear_config()
  try:
    # The evaluation gin alone: a model file, a task file and the eval template.
    cli.parse_gin(["models/tiny.gin", "tasks/world.gin", "runs/eval.gin"],
                  [f"MODEL_DIR = '{root / 'unused'}'", f"WORLD_DIR = '{root / 'world'}'"])
    assert gin_checks.missing_required("evaluate") == []
    assert not [k for k in gin_checks.bindings() if k.startswith(("make_optimizer.", "train."))]
    built = {name: cli.build(f"evaluate.{name}") for name in ("model", "data", "task_config")}
    world_splits = cli.build("evaluate.splits")
  finally:
    gin.clear_config()
  assert {t: tuple(s) for t, s in world_splits.items()} == {
      t: ("test",) for t in ("caption", "trace", "refer", "loca", "densecap", "refseg")}
  evaluator = evaluator_lib.Evaluator(**built, **EVAL_KW)
  return dict(root=root, counts=counts, built=built, evaluator=evaluator)


def _params(evaluator, seed):
  """Parameters of the model's shapes, random per `seed` (a distinct 'trained' model)."""
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(evaluator.abstract_params)
  return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _write_run(model_dir, evaluator, steps, *, final_step, delay=0.0, before_last=None,
               in_turn=False):
  """A training run's traces: run_record.json naming its last step (as training writes at
  its start), then a params-only checkpoint per step, `delay` seconds apart (`in_turn`:
  each once the previous one is evaluated, so that the job is waiting for it)."""
  run_record.save(str(model_dir), {"train.num_steps": str(final_step)})
  manager = checkpoint.make_manager(str(model_dir / "checkpoints"), async_save=False,
                                    max_to_keep=None)
  try:
    for i, step in enumerate(steps):
      deadline = time.monotonic() + 120
      while in_turn and i and not (model_dir / "eval" / str(steps[i - 1]) / "metrics.json"
                                   ).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
      time.sleep(delay)
      if before_last is not None and i == len(steps) - 1:
        before_last()
      checkpoint.save(manager, step, {"params": _params(evaluator, step), "step": np.int32(step)},
                      {"epoch": 0})
  finally:
    manager.close()


def _metrics(model_dir, step):
  with open(model_dir / "eval" / str(step) / "metrics.json") as f:
    return json.load(f)


def _logged_steps(model_dir):
  with open(model_dir / "eval" / "metrics.jsonl") as f:
    return [json.loads(line)["step"] for line in f]


def test_follow_evaluates_each_checkpoint_once_as_training_writes_it(world, tmp_path):
  evaluator, run = world["evaluator"], tmp_path / "run"
  run.mkdir()

  def unfinished_save():  # an interrupted save: Orbax never lists its temporary folder
    os.makedirs(run / "checkpoints" / "25.orbax-checkpoint-tmp-1700000000" / "state")

  writer = threading.Thread(target=_write_run, args=(run, evaluator, [10, 20, 30]),
                            kwargs=dict(final_step=30, delay=0.5, before_last=unfinished_save,
                                        in_turn=True))
  writer.start()
  start = time.monotonic()
  try:
    result = job.run(evaluator, str(run), job.Selection(mode="follow", poll_seconds=0.2,
                                                        timeout_seconds=120))
  finally:
    writer.join()
  seconds = time.monotonic() - start
  print(json.dumps({"follow_seconds": round(seconds, 1)}))
  assert not result.timed_out and result.skipped == []
  assert result.evaluated == [10, 20, 30]
  assert _logged_steps(run) == [10, 20, 30]  # TensorBoard scalars: each step once
  assert sorted(d for d in os.listdir(run / "eval") if d[0].isdigit()) == ["10", "20", "30"]
  assert [f for f in os.listdir(run / "eval") if f.startswith("events.out.tfevents")]
  per_step = {s: _metrics(run, s) for s in (10, 20, 30)}
  assert [m["checkpoint_step"] for m in per_step.values()] == [10, 20, 30]
  assert len({m["trace_l1"] for m in per_step.values()}) == 3  # three different models
  with open(run / "metrics.json") as f:
    assert json.load(f) == per_step[30]  # MODEL_DIR/metrics.json: the highest step

  # eval/summary.json: the best step per metric, in each metric's direction.
  with open(run / "eval" / "summary.json") as f:
    best = json.load(f)
  assert best["steps"] == [10, 20, 30] and best["latest_step"] == 30
  for name, better, pick in (("trace_l1", "lower", min), ("refer_mean_iou/val", "higher", max),
                             ("refer_mean_iou/test", "higher", max)):
    values = {s: per_step[s][name] for s in per_step}
    assert best["metrics"][name]["better"] == better
    assert best["metrics"][name]["best_step"] == pick(values, key=values.get)  # earliest on ties
    assert best["metrics"][name]["latest"] == values[30]
  assert "refer_count/val" not in best["metrics"] and "eval_seconds" not in best["metrics"]

  # A restarted job finds every step done: it evaluates nothing and stops at once.
  again = job.run(evaluator, str(run), job.Selection(mode="follow", poll_seconds=0.2,
                                                     timeout_seconds=60))
  assert again.evaluated == [] and again.skipped == [10, 20, 30] and not again.timed_out
  assert again.metrics[30] == per_step[30]
  assert _logged_steps(run) == [10, 20, 30]

  # A step whose metrics.json is incomplete (cut short) is evaluated again, and only it.
  path = run / "eval" / "20" / "metrics.json"
  path.write_text(path.read_text()[:40])
  redo = job.run(evaluator, str(run), job.Selection(mode="all"))
  assert redo.evaluated == [20] and redo.skipped == [10, 30]
  assert _metrics(run, 20) == {**per_step[20], "eval_seconds": _metrics(run, 20)["eval_seconds"]}


def test_follow_stops_after_the_timeout_without_a_new_checkpoint(world, tmp_path):
  evaluator, run = world["evaluator"], tmp_path / "run"
  run.mkdir()
  _write_run(run, evaluator, [10], final_step=30)  # training stalled after step 10
  start = time.monotonic()
  result = job.run(evaluator, str(run), job.Selection(mode="follow", poll_seconds=0.2,
                                                      timeout_seconds=2.0))
  seconds = time.monotonic() - start
  assert result.timed_out and result.evaluated == [10]
  assert seconds >= 2.0
  assert seconds < 2.0 + result.metrics[10]["eval_seconds"] + 10
  assert job.final_step(str(run)) == 30


def test_modes_latest_step_and_all(world, tmp_path):
  evaluator, run = world["evaluator"], tmp_path / "run"
  run.mkdir()
  _write_run(run, evaluator, [5, 7, 9], final_step=9)
  assert job.run(evaluator, str(run), job.Selection()).evaluated == [9]
  assert job.run(evaluator, str(run), job.Selection(mode="step", step=5)).evaluated == [5]
  # The mirror follows the highest evaluated step, not the last one evaluated.
  with open(run / "metrics.json") as f:
    assert json.load(f)["checkpoint_step"] == 9
  result = job.run(evaluator, str(run), job.Selection(mode="all"))
  assert result.evaluated == [7] and result.skipped == [5, 9]
  forced = job.run(evaluator, str(run), job.Selection(mode="step", step=7, reevaluate=True))
  assert forced.evaluated == [7]
  with pytest.raises(FileNotFoundError, match=r"step 8 .*\[5, 7, 9\]"):
    job.run(evaluator, str(run), job.Selection(mode="step", step=8))


def test_each_task_evaluates_on_its_own_splits(world, tmp_path):
  evaluator, counts, run = world["evaluator"], world["counts"], tmp_path / "run"
  run.mkdir()
  _write_run(run, evaluator, [3], final_step=3)
  metrics = job.run(evaluator, str(run), job.Selection()).latest
  assert metrics["splits"] == {"trace": ["test"], "refer": ["val", "test"]}
  # One split: the task's own flat names; several: the split after a slash.
  assert metrics["trace_images"] == counts["test"]["images"]
  assert math.isfinite(metrics["trace_l1"]) and "trace_l1/test" not in metrics
  for split in ("val", "test"):
    assert metrics[f"refer_count/{split}"] == counts[split]["expressions"]
    assert 0 <= metrics[f"refer_mean_iou/{split}"] <= 1
    with open(run / "eval" / "3" / split / "predictions_refer.jsonl") as f:
      assert len(f.readlines()) == counts[split]["expressions"]
    assert (run / "eval" / "3" / split / "refer_00.png").exists()
  assert "refer_p@0.5" not in metrics and "refer_count" not in metrics
  assert (run / "eval" / "3" / "test" / "trace_00.png").exists()


def test_missing_splits_stop_the_job_before_any_work_naming_them_all(world, tmp_path):
  run = tmp_path / "run"
  (run / "eval" / "4").mkdir(parents=True)
  older = {"checkpoint_step": 4, "refer_p@0.5": 0.5}
  (run / "eval" / "4" / "metrics.json").write_text(json.dumps(older))
  (run / "metrics.json").write_text(json.dumps(older))
  start = time.monotonic()
  with pytest.raises(evaluator_lib.MissingSplits) as error:
    evaluator_lib.evaluate(model_dir=str(run), **world["built"], **{
        **EVAL_KW, "splits": {"refer": ("testA", "val", "testB"), "trace": ("val", "test"),
                              "loca": ("test",), "caption": ("dev",)}})
  message = str(error.value)
  for missing in ("refer/testA", "refer/testB", "caption/dev"):
    assert missing in message
  for present in ("refer/val", "trace/val", "trace/test", "loca/test"):
    assert present not in message
  assert "Should be one of ['train', 'val', 'test']" in message
  assert time.monotonic() - start < 20  # no checkpoint restored, nothing compiled
  assert not (run / "metrics.json").exists()  # the older result does not pass for this one
  assert json.loads((run / "eval" / "4" / "metrics.json").read_text()) == older
  with pytest.raises(ValueError, match=r"no split for the tasks \['loca'\]"):
    evaluator_lib.plan_splits({"refer": ("val",)}, ["refer", "loca"])


def test_a_nan_metric_is_an_error_naming_it_and_nothing_is_written(world, tmp_path,
                                                                  monkeypatch):
  evaluator, run = world["evaluator"], tmp_path / "run"
  run.mkdir()
  _write_run(run, evaluator, [1, 2], final_step=2)
  job.run(evaluator, str(run), job.Selection(mode="step", step=1))
  trace = tasks.get("trace")

  def nan_l1(ctx, batches):
    return {**trace.evaluate(ctx, batches), "trace_l1": float("nan")}

  monkeypatch.setitem(tasks._REGISTRY, "trace", dataclasses.replace(trace, evaluate=nan_l1))
  with pytest.raises(outputs.NonFiniteMetric, match=r"step 2: .*trace_l1 = nan"):
    job.run(evaluator, str(run), job.Selection(mode="step", step=2))
  assert not (run / "eval" / "2" / "metrics.json").exists()
  assert not (run / "metrics.json").exists()
  assert _metrics(run, 1)["checkpoint_step"] == 1
  assert not outputs.is_done(str(run), 2, SPLITS)


def test_json_files_are_strict_and_written_whole(tmp_path):
  path = tmp_path / "m.json"
  outputs.write_json(str(path), {"a": np.float32(0.5), "n": np.int64(3), "s": {"x": [1.0]}})
  assert json.loads(path.read_text()) == {"a": 0.5, "n": 3, "s": {"x": [1.0]}}
  for bad, name in (({"a": 1.0, "b": float("inf")}, "b = inf"),
                    ({"s": {"x": [1.0, np.float32("nan")]}}, r"s\.x\[1\] = nan")):
    with pytest.raises(outputs.NonFiniteMetric, match=name):
      outputs.write_json(str(path), bad)
    assert json.loads(path.read_text())["a"] == 0.5  # the earlier file is untouched
  assert sorted(os.listdir(tmp_path)) == ["m.json"]  # no temporary file left behind


def test_summary_directions_ties_and_unknown_metrics():
  per_step = {10: {"trace_l1": 0.3, "refer_p@0.5/testA": 0.2, "caption_cider": 1.0,
                   "loca_count": 5, "mystery": 1.0, "splits": {"refer": ["testA"]}},
              20: {"trace_l1": 0.1, "refer_p@0.5/testA": 0.2, "caption_cider": 2.0,
                   "loca_count": 9, "mystery": 2.0},
              30: {"trace_l1": 0.2, "refer_p@0.5/testA": 0.1, "caption_cider": 1.5}}
  got = summary.summarize(per_step)
  assert got["steps"] == [10, 20, 30] and got["unranked"] == ["mystery"]
  assert got["metrics"]["trace_l1"] == {"better": "lower", "best_step": 20, "best": 0.1,
                                        "latest": 0.2, "steps": 3}
  assert got["metrics"]["refer_p@0.5/testA"]["best_step"] == 10  # a tie: the earliest
  assert got["metrics"]["caption_cider"]["best_step"] == 20
  assert "loca_count" not in got["metrics"]
  for name in ("caption_meteor", "loca_bleu4", "caption_rouge_l", "refer_mean_iou",
               "trace_pointing_acc", "loca_exact_match", "densecap_map"):
    assert summary.direction(name) == "higher", name
  assert summary.direction("refer_count/val") is None


def test_selection_flags_are_checked():
  with pytest.raises(ValueError, match="--step=N goes with --mode=step"):
    job.Selection(mode="latest", step=3)
  with pytest.raises(ValueError, match="--mode=step needs --step"):
    job.Selection(mode="step")
  with pytest.raises(ValueError, match="apply to --mode=follow"):
    job.Selection(mode="all", timeout_seconds=5)


def test_one_and_eight_devices_give_the_same_metrics(world, tmp_path):
  """8 fake devices (the shared evaluator) and 1 device evaluate the same checkpoint."""
  run = tmp_path / "run"
  run.mkdir()
  _write_run(run, world["evaluator"], [6], final_step=6)
  eight = job.run(world["evaluator"], str(run), job.Selection()).latest
  # No pictures (they do not change metrics): the greedy decoder is not compiled again.
  one_device = evaluator_lib.Evaluator(**world["built"], **{**EVAL_KW, "num_visualizations": 0},
                                       partitioner=Partitioner(devices=jax.devices()[:1]))
  assert one_device.partitioner.mesh.size == 1 and world["evaluator"].partitioner.mesh.size == 8
  one = one_device.evaluate_step(6, one_device.restore(str(run / "checkpoints"), 6),
                                 str(tmp_path / "one"))
  assert sorted(one) == sorted(k for k in eight if k != "eval_seconds")
  for name, value in one.items():
    if isinstance(value, float):
      # The two programs differ in how XLA splits the batch (8 rows on one device, one
      # row on each of 8), so float32 results round differently (measured: 2e-8 at most,
      # also on IoUs of 0.015 from small box overlaps); counts and P@0.5 are exact.
      np.testing.assert_allclose(value, eight[name], rtol=1e-6, atol=1e-7, err_msg=name)
    else:
      assert value == eight[name], name
