"""A tiny model dir for the inference tests (tests/test_infer.py, tests/test_serve_page.py).

A generated world (its tokenizer and images) and a model dir as a training run leaves it:
`config.gin` written by `cli.write_operative_config` (training's own writer) from the world
demo's gin, and a checkpoint of the tiny model's parameters (random, seeded: compiling a
training step takes about a minute here, and inference reads any step alike) written with
the trainer's checkpoint manager.
"""
import os

import gin
import jax
import numpy as np

from pixelllm_jax import cli
from pixelllm_jax.data.world import generate
from pixelllm_jax.train import checkpoint
from pixelllm_jax.train import state as state_lib

STEP = 7


def make_run(root: str, seed: int = 0) -> dict[str, str]:
  """{'world': its folder, 'model_dir': the run, 'images': the world's test images folder}."""
  world, model_dir = os.path.join(root, "world"), os.path.join(root, "run")
  generate.generate_world(world, num_train=2, num_val=1, num_test=3, seed=3)
  gin.clear_config()
  try:
    cli.parse_gin(["runs/demo.gin"], [f"MODEL_DIR = '{model_dir}'", f"WORLD_DIR = '{world}'",
                                      "TRAIN_STEPS = 10"])
    model = cli.build("train.model")
    task_config = cli.build("train_data.task_config")
    cli.build("train_data.data")
    cli.write_operative_config(model_dir)  # what the trainer writes after its first step
  finally:
    gin.clear_config()
  abstract = model.abstract_batch(batch_size=1, num_slots=1, num_prompts=1,
                                  length=task_config.max_target_len,
                                  context_length=task_config.max_context_len)
  batch = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  params = nn.meta.unbox(jax.jit(state_lib.param_init_fn(model, batch))(jax.random.key(seed)))
  manager = checkpoint.make_manager(os.path.join(model_dir, "checkpoints"), async_save=False)
  try:
    checkpoint.save(manager, STEP, {"params": params, "step": np.int32(STEP)}, {"epoch": 0})
  finally:
    manager.close()
  return {"world": world, "model_dir": model_dir, "images": os.path.join(world, "images")}
