"""Every shipped gin config parses, builds what it names, and opens with the command that runs it.

- models/*.gin: parsed alone; `PixelLLM()` built from it and initialized abstractly
  (`jax.eval_shape`: no parameter memory, no compilation).
- tasks/*.gin (and any other directory): parsed alone, MODEL_DIR bound (macros they take from
  the model file resolve lazily, so parsing alone needs nothing else).
- runs/*.gin: parsed with MODEL_DIR bound, as the header command does; the configured
  `train.model`, `train.optimizer`, `train.loss_fn` and `train.mesh` are built and checked
  (abstract init, optimizer state shapes, one loss on a toy output). Training and datasets are not
  touched: `train.train_data` is only checked to be bound.
- Every file opens with a comment holding the command that runs it (STYLE.md item 8), and every
  `--gin_file=` in such a command names a shipped config.
"""
import copy
import glob
import inspect
import os
import re

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_fixtures as mf
from pixelllm_jax import losses, sharding  # noqa: F401  (registers make_mesh)
from pixelllm_jax.batch import Output
from pixelllm_jax.models.pixel_llm import PixelLLM, PixelLLMConfig
from pixelllm_jax.train import trainer

GIN_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "gin_configs"))
ALL_CONFIGS = sorted(glob.glob(os.path.join(GIN_DIR, "**", "*.gin"), recursive=True))
MODEL_CONFIGS = sorted(glob.glob(os.path.join(GIN_DIR, "models", "*.gin")))
RUN_CONFIGS = sorted(glob.glob(os.path.join(GIN_DIR, "runs", "*.gin")))
# tasks/*.gin and anything else: parsed alone.
OTHER_CONFIGS = sorted(set(ALL_CONFIGS) - set(MODEL_CONFIGS) - set(RUN_CONFIGS))
COMMAND = re.compile(r"(python3? -m \S+|bash \S+)")


def _rel(path: str) -> str:
  return os.path.relpath(path, GIN_DIR)


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  gin.add_config_file_search_path(GIN_DIR)
  yield
  gin.clear_config()


def _parse(path: str, bindings=()) -> None:
  gin.parse_config_files_and_bindings([path], list(bindings), finalize_config=False)


def test_configs_are_found():
  assert MODEL_CONFIGS and RUN_CONFIGS
  assert any(_rel(p).startswith("tasks/") for p in OTHER_CONFIGS)


def _header(path: str) -> list[str]:
  lines = open(path).read().splitlines()
  header = []
  for line in lines:
    if not line.startswith("#"):
      break
    header.append(line)
  return header


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_rel)
def test_header_opens_with_the_command_that_runs_it(path):
  header = _header(path)
  assert header, f"{_rel(path)} must open with a comment"
  commands = [m.group(0) for line in header for m in [COMMAND.search(line)] if m]
  assert commands, f"{_rel(path)}: no 'python -m ...' or 'bash ...' command in its header"
  for line in header:
    for name in re.findall(r"--gin_file=(\S+)", line):
      name = name.strip("'\"")
      assert os.path.exists(os.path.join(GIN_DIR, name)), f"{_rel(path)} names missing {name}"


def _abstract_init(model: PixelLLM):
  """jax.eval_shape of model.init on a toy batch shaped for the model's config."""
  cfg = model.config
  image_size = (cfg.eva02 or cfg.sam).image_size
  batch = mf.random_batch(0, b=1, k=2, n=2, l=5, lc=4, p=cfg.loc_head.points_per_token,
                          image_size=image_size)
  variables = jax.eval_shape(model.init, {"params": jax.random.key(0)}, batch)
  return nn.meta.unbox(variables), batch


def _param_count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=_rel)
def test_model_config_builds_and_initializes_abstractly(path):
  _parse(path)
  model = PixelLLM()
  assert isinstance(model.config, PixelLLMConfig)
  variables, _ = _abstract_init(model)
  params = variables["params"]
  assert {"t5", "loc_head", "extractor", "prompt_encoder"} <= set(params)
  assert _param_count(params) > 0
  logits_kernel = params["t5"]["decoder"]["logits_dense"]["kernel"]
  assert logits_kernel.shape[-1] == model.config.t5.vocab_size


def _bind_model_dir():
  return ["MODEL_DIR = '/tmp/pixelllm_config_test_never_written'"]


@pytest.mark.parametrize("path", OTHER_CONFIGS, ids=_rel)
def test_task_and_other_configs_parse_alone(path):
  _parse(path, _bind_model_dir())


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=_rel)
def test_run_config_resolves_model_optimizer_loss_and_mesh(path):
  _parse(path, _bind_model_dir())
  # Every required argument of train() is bound.
  required = [name for name, p in inspect.signature(trainer.train).parameters.items()
              if p.default is gin.REQUIRED]
  for name in required:
    gin.query_parameter(f"train.{name}")
  assert gin.query_parameter("train.model_dir") is not None

  model = copy.deepcopy(gin.query_parameter("train.model"))  # evaluates @PixelLLM()
  assert isinstance(model, PixelLLM)
  variables, batch = _abstract_init(model)

  optimizer = copy.deepcopy(gin.query_parameter("train.optimizer"))
  opt_state = jax.eval_shape(optimizer.init, variables["params"])
  assert _param_count(opt_state) > 0

  mesh_ref = gin.query_parameter("train.mesh")
  if mesh_ref is not None:
    mesh = copy.deepcopy(mesh_ref)
    assert tuple(mesh.axis_names) == sharding.MESH_AXES

  loss_ref = gin.query_parameter("train.loss_fn")
  loss_fn = loss_ref.scoped_configurable_fn  # with the file's bindings (e.g. its LossConfig)
  b, n, l = batch.decoder_target_tokens.shape
  p = batch.point_targets.shape[3]
  out = Output(logits=jnp.zeros((b, n, l, model.config.t5.vocab_size)),
               points=jnp.full((b, n, l, p, 2), 0.5), hidden=jnp.zeros((b, n, l, 1)))
  total, metrics = loss_fn(out, batch)
  assert np.isfinite(float(total)) and "point_loss" in metrics

  # The data is configured but never built here.
  assert gin.query_parameter("train.train_data").selector.endswith("train_data")
