"""Every shipped gin config parses, builds what it names, and opens with the command that runs it.

- models/*.gin: parsed alone; `PixelLLMModel()` built from it and initialized abstractly
  (`jax.eval_shape`: no parameter memory, no compilation).
- tasks/*.gin and the run templates (runs/train.gin, runs/eval.gin): parsed alone, MODEL_DIR
  bound (macros they take from other files resolve lazily, so parsing alone needs nothing else);
  a template's header lists what is required and what is commonly overridden.
- the other runs/*.gin: parsed with MODEL_DIR bound, as the header command does; every required
  argument of `train()` and `evaluate()` is bound; the configured model, optimizer, loss,
  partitioner, data config and task config are built and checked (abstract init, optimizer
  state shapes, one loss on a toy output). Datasets are never touched.
- Every file opens with a comment holding the command that runs it (STYLE: configs say how they
  are run), and every `--gin_file=` in such a command names a shipped config.
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

from pixelllm_jax import configurables, losses, partitioning
from pixelllm_jax.batch import Output
from pixelllm_jax.data.sources import DataConfig
from pixelllm_jax.eval import evaluator
from pixelllm_jax.model import PixelLLMModel
from pixelllm_jax.models.pixel_llm import PixelLLMConfig
from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.tasks import TaskConfig
from pixelllm_jax.train import trainer

GIN_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "gin_configs"))
ALL_CONFIGS = sorted(glob.glob(os.path.join(GIN_DIR, "**", "*.gin"), recursive=True))
MODEL_CONFIGS = sorted(glob.glob(os.path.join(GIN_DIR, "models", "*.gin")))
TEMPLATES = [os.path.join(GIN_DIR, "runs", name) for name in ("train.gin", "eval.gin")]
RUN_CONFIGS = sorted(set(glob.glob(os.path.join(GIN_DIR, "runs", "*.gin"))) - set(TEMPLATES))
# tasks/*.gin, the templates and anything else: parsed alone.
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


def _abstract_init(model: PixelLLMModel):
  """jax.eval_shape of model.init on an abstract batch at the model's canvas."""
  batch = model.abstract_batch(num_slots=2, num_prompts=2, length=5, context_length=4)
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), batch)), batch


def _param_count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=_rel)
def test_model_config_builds_and_initializes_abstractly(path):
  _parse(path)
  model = configurables.REGISTERED["PixelLLMModel"][1]()
  assert isinstance(model, PixelLLMModel) and isinstance(model.config, PixelLLMConfig)
  params, _ = _abstract_init(model)
  assert {"t5", "loc_head", "extractor", "prompt_encoder"} <= set(params)
  assert _param_count(params) > 0
  logits_kernel = params["t5"]["decoder"]["logits_dense"]["kernel"]
  assert logits_kernel.shape[-1] == model.config.t5.vocab_size


def _bind_model_dir():
  return ["MODEL_DIR = '/tmp/pixelllm_config_test_never_written'"]


@pytest.mark.parametrize("path", OTHER_CONFIGS, ids=_rel)
def test_task_and_other_configs_parse_alone(path):
  _parse(path, _bind_model_dir())


@pytest.mark.parametrize("path", TEMPLATES, ids=_rel)
def test_templates_say_what_is_required_and_commonly_overridden(path):
  header = "\n".join(_header(path))
  assert "Required:" in header and "Commonly overridden:" in header
  assert "MODEL_DIR" in header


def _required(fn) -> list[str]:
  return [name for name, p in inspect.signature(fn).parameters.items()
          if p.default is inspect.Parameter.empty and p.kind == p.KEYWORD_ONLY]


def _build(name: str):
  return copy.deepcopy(gin.query_parameter(name))  # evaluates @Configurable() references


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=_rel)
def test_run_config_resolves_model_optimizer_loss_partitioner_and_data(path):
  _parse(path, _bind_model_dir())
  # Every required argument of train() and evaluate() is bound.
  for fn, prefix in ((trainer.train, "train"), (evaluator.evaluate, "evaluate")):
    for name in _required(fn):
      assert gin.query_parameter(f"{prefix}.{name}") is not None, f"{prefix}.{name}"

  model = _build("train.model")
  assert isinstance(model, PixelLLMModel)
  params, batch = _abstract_init(model)
  assert isinstance(_build("evaluate.model"), PixelLLMModel)

  optimizer = _build("train.optimizer")
  opt_state = jax.eval_shape(optimizer.init, params)
  assert _param_count(opt_state) > 0

  for name in ("train.partitioner", "evaluate.partitioner"):
    partitioner = _build(name)
    assert isinstance(partitioner, Partitioner)
    assert tuple(partitioner.mesh.axis_names) == partitioning.MESH_AXES
  for name in ("train_data.data", "evaluate.data"):
    assert isinstance(_build(name), DataConfig)
  for name in ("train_data.task_config", "evaluate.task_config"):
    assert isinstance(_build(name), TaskConfig)

  b, n, l = batch.decoder_target_tokens.shape
  p = batch.point_targets.shape[3]
  out = Output(logits=jnp.zeros((b, n, l, model.config.t5.vocab_size)),
               points=jnp.full((b, n, l, p, 2), 0.5), hidden=jnp.zeros((b, n, l, 1)))
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), batch)
  total, metrics = losses.compute_losses(out, zeros, model.loss_config)
  assert np.isfinite(float(total)) and "point_loss" in metrics

  # The data is configured but never built here.
  assert gin.query_parameter("train.train_data").selector.endswith("train_data")
