"""A trained model for inference: its gin configuration, its parameters, its tokenizer.

Where the parameters come from (`--checkpoint`):
- a training run's model dir (it holds `checkpoints/<step>/`), or that `checkpoints/`
  folder: the parameters alone of the latest step (or `step`) are restored
  (`Partitioner.restore_params`: no optimizer state, no optimizer gin);
- converted weights (`python -m pixelllm_jax.convert`, a bare params tree written by
  `checkpoint.save_params`): read with `checkpoint.load_params`, which must cover every
  parameter of the model (inference from a partly random model would mislead: the
  leaves it lacks are named in an error).

Which model (and its task lengths, prompts and tokenizer): the gin files given, else the
run's operative config `MODEL_DIR/config.gin`, which training writes after its first step.
The model, `TaskConfig` and `DataConfig` are gin-built from their own bindings (the
factories of `configurables.py`), so a training run's config, an evaluation's or a model
file plus a task file all serve. The tokenizer is `DataConfig`'s (its manual dir's
`spiece.model`, or `tokenizer_path`) unless `tokenizer` names one.

Everything runs on one device (the first of `jax.devices()`), batch size 1.
"""
import argparse
import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pixelllm_jax import cli
from pixelllm_jax.batch import Batch
from pixelllm_jax.data.tokenizer import Tokenizer
from pixelllm_jax.model import BaseModel
from pixelllm_jax.partitioning import Partitioner
from pixelllm_jax.tasks import TaskConfig
from pixelllm_jax.train import checkpoint
from pixelllm_jax.train import state as state_lib

CONFIG_FILE = "config.gin"


@dataclasses.dataclass
class Loaded:
  """A model ready to predict.

  step: the checkpoint step (None for converted weights).
  source: the checkpoint path as given; config: the gin files read.
  """
  model: BaseModel
  params: Any
  tokenizer: Tokenizer
  task_config: TaskConfig
  partitioner: Partitioner
  step: int | None
  source: str
  config: tuple[str, ...]


def _is_steps_folder(path: str) -> bool:
  return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def locate(checkpoint_path: str) -> tuple[str | None, str | None]:
  """(the run's checkpoints folder or None for a bare params tree, its config.gin or None)."""
  path = os.path.abspath(checkpoint_path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--checkpoint {checkpoint_path}: no such directory")
  if _is_steps_folder(os.path.join(path, "checkpoints")):
    steps, model_dir = os.path.join(path, "checkpoints"), path
  elif _is_steps_folder(path):
    steps, model_dir = path, os.path.dirname(path)
  else:
    steps, model_dir = None, path
  config = os.path.join(model_dir, CONFIG_FILE)
  return steps, (config if os.path.isfile(config) else None)


def _gin_built(name: str) -> Any:
  """`name()` as gin builds it from its bindings (`configurables.py`)."""
  from pixelllm_jax import configurables  # pylint: disable=import-outside-toplevel
  return configurables.REGISTERED[name][1]()


def _tokenizer(path: str | None) -> Tokenizer:
  extra_ids = cli.build("DataConfig.extra_ids")
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--tokenizer {path}: no such file")
    return (Tokenizer.from_file(path) if extra_ids is None
            else Tokenizer.from_file(path, extra_ids=extra_ids))
  try:
    data = _gin_built("DataConfig")
  except TypeError as e:  # DataConfig.manual_dir unbound
    raise ValueError("the configuration names no tokenizer (no DataConfig.manual_dir / "
                     "tokenizer_path): give --tokenizer=PATH (T5's spiece.model for the paper "
                     "models)") from e
  if not os.path.exists(data.tokenizer_file):
    raise FileNotFoundError(
        f"tokenizer {data.tokenizer_file} (from the configuration's DataConfig; a relative "
        "path is read from the current folder) not found: run from the training's folder, "
        "or give --tokenizer=PATH")
  return data.tokenizer()


def init_batch(model: BaseModel, task_config: TaskConfig) -> Batch:
  """A zero batch of inference's shapes: B = N = K = 1, the task config's lengths."""
  abstract = model.abstract_batch(batch_size=1, num_slots=1, num_prompts=1,
                                  length=task_config.max_target_len,
                                  context_length=task_config.max_context_len)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def _restore_bare(path: str, boxed: Any, partitioner: Partitioner) -> Any:
  """Converted weights over NaN placeholders: a leaf still NaN was not in the checkpoint."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  abstract = nn.meta.unbox(boxed)
  shardings = partitioner.shardings_of(boxed)
  placeholders = jax.tree.map(
      lambda s, sh: jax.device_put(jnp.full(s.shape, jnp.nan, s.dtype), sh), abstract, shardings)
  params = checkpoint.load_params(path, placeholders, shardings)
  missing = ["/".join(str(getattr(k, "key", k)) for k in kp)
             for kp, x in jax.tree_util.tree_leaves_with_path(params)
             if bool(jnp.isnan(x).any())]
  if missing:
    raise ValueError(f"{path}: the weights do not cover the model: {len(missing)} parameters "
                     f"missing (or NaN), e.g. {missing[:8]}")
  return params


def load(checkpoint_path: str, gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = (),
         *, step: int | None = None, tokenizer: str | None = None,
         gin_search_paths: Sequence[str] = ()) -> Loaded:
  """The model at `checkpoint_path` (module docstring), parsed into this process's gin
  configuration (a command starts with an empty one)."""
  steps_dir, run_config = locate(checkpoint_path)
  config = tuple(gin_files) or ((run_config,) if run_config else ())
  if not config:
    raise ValueError(
        f"--checkpoint {checkpoint_path} has no {CONFIG_FILE} (a training run writes it after "
        "its first step; converted weights have none): give the model's gin files, e.g. "
        "--gin_file=runs/demo.gin")
  if steps_dir is None and step is not None:
    raise ValueError(f"--step={step}: {checkpoint_path} is not a training run's checkpoints")
  cli.parse_gin(config, gin_bindings, gin_search_paths)
  model = _gin_built("PixelLLMModel")
  task_config = _gin_built("TaskConfig")
  tokenizer_ = _tokenizer(tokenizer)
  model.check_vocab(tokenizer_.vocab_size)
  partitioner = Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  boxed, _ = partitioner.abstract_params(
      state_lib.param_init_fn(model, init_batch(model, task_config)))
  if steps_dir is not None:
    step, params = partitioner.restore_params(steps_dir, boxed, step=step)
  else:
    params = _restore_bare(os.path.abspath(checkpoint_path), boxed, partitioner)
  return Loaded(model=model, params=params, tokenizer=tokenizer_, task_config=task_config,
                partitioner=partitioner, step=step, source=checkpoint_path, config=config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags that choose the model (shared by `pixelllm-infer` and `pixelllm-serve`)."""
  parser.add_argument("--checkpoint", required=True,
                      help="a training run's model dir (or its checkpoints/ folder), or "
                           "converted weights (python -m pixelllm_jax.convert) with --gin_file")
  parser.add_argument("--step", type=int, default=None,
                      help="the checkpoint step (default: the latest)")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="the model's gin files (default: the run's config.gin); repeatable")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="gin bindings; --gin.NAME=VALUE is the shorthand (repeatable)")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="extra folders for --gin_file and gin includes")
  parser.add_argument("--tokenizer", default=None,
                      help="the sentencepiece model (default: the configuration's DataConfig)")
  parser.add_argument("--max_decode_len", type=int, default=None,
                      help="tokens generated at most (default: TaskConfig.max_target_len)")
  parser.add_argument("--beam_size", type=int, default=1,
                      help="beam search for generated answers (default 1: greedy decoding)")
  parser.add_argument("--alpha", type=float, default=0.6,
                      help="beam search's brevity penalty exponent (official: 0.6)")


def load_from_args(args: argparse.Namespace) -> Loaded:
  """`load` with the flags of `add_arguments`."""
  return load(args.checkpoint, args.gin_file, args.gin_bindings, step=args.step,
              tokenizer=args.tokenizer, gin_search_paths=args.gin_search_paths)
