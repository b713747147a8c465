"""Command line for training, t5x style: gin files + bindings in, `trainer.train` run.

  python -m pixelllm_jax.train \\
    --gin_file=runs/demo.gin \\
    --gin.MODEL_DIR="'runs/x'" --gin.TRAIN_STEPS=100

Flags:
  --gin_file          (repeatable) config files, searched in --gin_search_paths
                      (the repository's gin_configs/ is always searched last).
  --gin_bindings      (repeatable) bindings such as "train.seed = 3".
  --gin.NAME=VALUE    shorthand for --gin_bindings="NAME = VALUE" (rewritten before
                      absl parses argv, as t5x does), e.g. macros MODEL_DIR, TRAIN_STEPS.
  --gin_search_paths  (repeatable) extra directories for --gin_file and gin `include`s.
  --coordinator_address / --process_count / --process_index
                      multi-host runs: passed to `jax.distributed.initialize`.

Gin files name the modules they use with gin `import` lines (e.g.
`import pixelllm_jax.models.pixel_llm`); this module only imports the
training stack. The operative config is written to MODEL_DIR/config.gin
after the first step, when every configurable has been called.
"""
import os
from typing import Sequence

import gin
import jax
from absl import app, flags, logging

from pixelllm_jax import sharding  # noqa: F401  (registers make_mesh with gin)
from pixelllm_jax.train import optim  # noqa: F401  (registers make_optimizer, Trainable)
from pixelllm_jax.train import trainer

DEFAULT_GIN_SEARCH_PATH = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "gin_configs")
)

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config files (repeatable).")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'train.seed = 1' (repeatable).")
flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories to search for gin files.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: coordinator host:port.")
flags.DEFINE_integer("process_count", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_index", None, "Multi-host: this process's index.")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE`; other args unchanged."""
  out = []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      out.append(f"--gin_bindings={name} = {value}")
    else:
      out.append(arg)
  return out


def resolve_gin_file(name: str, search_paths: Sequence[str]) -> str:
  """The absolute path of `name`: as given, else under the first search path holding it.

  Resolved here rather than by gin, whose resource reader takes a relative path
  whose first folder is importable (e.g. the `runs/` output folder in the
  working directory, a namespace package) for a package resource and fails.
  """
  for base in ["", *search_paths]:
    candidate = os.path.join(base, name)
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise FileNotFoundError(f"gin file {name!r} not found as given or under {list(search_paths)}")


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Adds search paths (given ones first, then gin_configs/) and parses files + bindings."""
  paths = [os.path.abspath(p) for p in [*search_paths, DEFAULT_GIN_SEARCH_PATH]]
  for path in paths:
    gin.add_config_file_search_path(path)
  files = [resolve_gin_file(f, paths) for f in gin_files]
  gin.parse_config_files_and_bindings(files, list(gin_bindings), finalize_config=False)


def run(argv: Sequence[str]) -> trainer.TrainResult:
  """The entry after absl parsed flags: gin, then the gin-configured `train()`."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  if FLAGS.coordinator_address:
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.process_count,
        process_id=FLAGS.process_index,
    )
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
  logging.info("Devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
               jax.process_count())
  result = trainer.train()
  logging.info("Done: %s in %.1f s", result.metrics, result.train_seconds)
  return result


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser after the `--gin.` rewrite; returns the remaining argv."""
  return app.parse_flags_with_usage(rewrite_gin_args(argv))


def _main(argv: Sequence[str]) -> None:
  run(argv)  # app.run would pass a non-None return value to sys.exit


def cli() -> None:
  app.run(_main, flags_parser=parse_flags)
