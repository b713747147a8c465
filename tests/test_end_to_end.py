"""End to end on a small generated world: generate -> tfds -> grain -> train -> evaluate.

A short run of the tiny model must localize referring expressions well above
chance. Chance here is the best image-blind answer: the mean training box for
every expression (a model that ignores the image and the words can do no
better on IoU), evaluated on the same held-out expressions.
"""
import json
import os

import gin
import numpy as np
import pytest

from pixelllm_jax import cli, configurables
from pixelllm_jax.data.world import generate
from pixelllm_jax.metrics import refer as refer_metrics

STEPS = int(os.environ.get("PIXELLLM_E2E_STEPS", "1500"))


def _refer_boxes(data, split):
  source = data.data_source("refer", split)
  boxes = []
  for i in range(len(source)):
    record = source[i]
    object_boxes = np.asarray(record["objects"]["box"], np.float32).reshape(-1, 4)
    index = np.asarray(record["expressions"]["object_index"]).reshape(-1)
    boxes.extend(object_boxes[index])
  return np.stack(boxes)


@pytest.mark.slow
def test_short_run_localizes_referring_expressions_above_chance(tmp_path):
  world, model_dir = str(tmp_path / "world"), str(tmp_path / "run")
  generate.generate_world(world, num_train=1500, num_val=10, num_test=40, seed=3)
  gin.clear_config()
  cli.parse_gin(["runs/demo.gin"], [
      f"MODEL_DIR = '{model_dir}'", f"WORLD_DIR = '{world}'", f"TRAIN_STEPS = {STEPS}",
      "make_optimizer.warmup_steps = 50", "train.log_every = 100",
      "train.checkpoint_every = 100000",
      "train_data.mixture = (('refer', 2.0), ('trace', 1.0))",
      # Only pointing tasks here: the paper's point-loss weight (the demo lowers it so that
      # its text tasks can teach object names).
      "LossConfig.point_loss_weight = 38.4",
      "evaluate.tasks = ('refer',)", "evaluate.num_visualizations = 2"])
  try:
    result = configurables.train()
    metrics = configurables.evaluate()
    data = configurables.REGISTERED["DataConfig"][1]()
    test_boxes = _refer_boxes(data, "test")
    constant = np.broadcast_to(_refer_boxes(data, "train").mean(0), test_boxes.shape)
    chance = refer_metrics.refer_precision(constant, test_boxes)
  finally:
    gin.clear_config()
  print(json.dumps({"steps": STEPS, "train_seconds": result.train_seconds,
                    "refer_p@0.5": metrics["refer_p@0.5"],
                    "refer_mean_iou": metrics["refer_mean_iou"],
                    "chance_p@0.5": chance.precision, "chance_mean_iou": chance.mean_iou}))
  assert metrics["refer_count"] == len(test_boxes)  # every expression evaluated
  assert os.path.exists(os.path.join(model_dir, "metrics.json"))
  assert metrics["refer_mean_iou"] > chance.mean_iou + 0.05
  assert metrics["refer_p@0.5"] > max(3 * chance.precision, chance.precision + 0.03)
