"""The one gin helper every command line uses: flags, `--gin.NAME=VALUE`, search paths,
parsing, the operative config, multi-process start-up.

  python -m pixelllm_jax.train --gin_file=runs/demo.gin --gin.MODEL_DIR="'runs/x'"

Flags (absl; `python -m pixelllm_jax.train --help` lists them):
  --gin_file          (repeatable) config files, searched in --gin_search_paths
                      (the repository's gin_configs/ is always searched last).
  --gin_bindings      (repeatable) bindings such as "train.seed = 3".
  --gin.NAME=VALUE    shorthand for --gin_bindings="NAME = VALUE" (rewritten before
                      absl parses argv, as t5x does), e.g. macros MODEL_DIR, TRAIN_STEPS.
  --gin_search_paths  (repeatable) extra directories for --gin_file and gin `include`s.
  --coordinator_address / --process_count / --process_index
                      multi-process runs: passed to `jax.distributed.initialize`.
  --heartbeat_timeout_seconds
                      multi-process runs: a process that stops answering for this long
                      (e.g. killed) ends the others with an error instead of a hang.
  --allow_config_change
                      resume (or evaluate) although the configuration differs from the one
                      the checkpoints were made with (see train/run_record.py).

Start-up checks, before any data is prepared (gin_checks.py): a macro bound on the command line
that no config file defines or uses is an error (a typo would make a new macro), and so is a
`%gin.REQUIRED` value the entry point would receive. `startup_record` adds the tokenizer:
its size against the model's vocabulary, and its file's hash to the run record.
"""
import contextlib
import copy
import hashlib
import logging as std_logging
import os
from typing import Any, Callable, Iterator, Sequence

import gin
import jax
from absl import app, flags, logging

from pixelllm_jax import gin_checks

DEFAULT_GIN_SEARCH_PATH = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "gin_configs"))

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config files (repeatable).")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'train.seed = 1' (repeatable).")
flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories to search for gin files.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: coordinator host:port.")
flags.DEFINE_integer("process_count", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_index", None, "Multi-process: this process's index.")
flags.DEFINE_integer("heartbeat_timeout_seconds", 60,
                     "Multi-process: a process silent this long ends the run with an error.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume / evaluate although the configuration changed (it is intended).")


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


class _DropIncludeProbes(std_logging.Filter):
  """Gin looks for an `include`d file under every search path in turn and logs each
  miss as an error ("Path not found") before it finds the file; those are not errors."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno == std_logging.ERROR
                and str(record.msg).startswith("Path not found"))


def _safe_package_probe(config_path: str) -> str:
  """gin's package-resource probe for an `include`d path, failing cleanly on a namespace package.

  gin tries every include first as a package resource (`runs/train.gin` -> package `runs`). A
  plain folder of that name in the working directory (the demo's `runs/` model dirs) is a
  namespace package without a file, on which gin's probe raises TypeError instead of reporting
  "not found", so the include never reaches the search paths. Reported as not found here.
  """
  try:
    return _GIN_PACKAGE_PROBE(config_path)
  except TypeError as e:
    raise ValueError(f"{config_path}: not a regular package") from e


_GIN_PACKAGE_PROBE = gin.resource_reader._parse_config_path  # pylint: disable=protected-access
gin.resource_reader._parse_config_path = _safe_package_probe  # pylint: disable=protected-access


@contextlib.contextmanager
def _quiet_include_probes() -> Iterator[None]:
  root = std_logging.getLogger()
  probe_filter = _DropIncludeProbes()
  root.addFilter(probe_filter)
  try:
    yield
  finally:
    root.removeFilter(probe_filter)


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Adds search paths (given ones first, then gin_configs/) and parses files + bindings.

  Registers the project's configurables first (`pixelllm_jax.configurables`).
  """
  from pixelllm_jax import configurables  # noqa: F401  pylint: disable=import-outside-toplevel
  paths = [os.path.abspath(p) for p in [*search_paths, DEFAULT_GIN_SEARCH_PATH]]
  for path in paths:
    gin.add_config_file_search_path(path)
  files = [resolve_gin_file(f, paths) for f in gin_files]
  with _quiet_include_probes():
    gin.parse_config_files_and_bindings(files, [], finalize_config=False)
  problems = gin_checks.unknown_macros(gin_bindings, gin_checks.known_macros(gin_checks.bindings()))
  if problems:
    raise ValueError("unknown macro on the command line:\n  " + "\n  ".join(problems))
  gin.parse_config(list(gin_bindings))


def write_operative_config(model_dir: str) -> None:
  """Writes the gin config that was actually used to `model_dir/config.gin`. A resumed run
  whose config differs keeps the earlier one as `config.<n>.gin` (n = 1, 2, ...)."""
  os.makedirs(model_dir, exist_ok=True)
  path, text = os.path.join(model_dir, "config.gin"), gin.operative_config_str()
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    n = 1
    while os.path.exists(os.path.join(model_dir, f"config.{n}.gin")):
      n += 1
    os.replace(path, os.path.join(model_dir, f"config.{n}.gin"))
  with open(path, "w") as f:
    f.write(text)


def start(argv: Sequence[str], entry: str | None = None) -> None:
  """The common start of a gin command line once absl parsed its flags: no stray
  arguments, `jax.distributed` for multi-process runs, quiet logs, gin parsed, and no
  `%gin.REQUIRED` value left for `entry` (the gin name of the entry point)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  if FLAGS.coordinator_address:
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.process_count,
        process_id=FLAGS.process_index,
        heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
    )
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
  if entry is not None:
    missing = gin_checks.missing_required(entry)
    if missing:
      raise app.UsageError(
          f"{entry} needs values the config leaves %gin.REQUIRED: " + ", ".join(missing)
          + " (give them as --gin." + "=... --gin.".join(missing) + "=...)")


def build(name: str) -> Any:
  """The object gin builds for binding `name` (e.g. 'train.model'), or None if unbound."""
  try:
    reference = gin.query_parameter(name)
  except ValueError:
    return None
  return copy.deepcopy(reference)  # evaluates @Configurable() references


def startup_record(entry: str, data_binding: str) -> dict[str, str]:
  """The run record of `entry` (gin_checks.run_record), plus the tokenizer: its file's hash
  and size, checked against the model's vocabulary before anything is prepared.

  `data_binding` names the entry's DataConfig (e.g. 'train_data.data'); configs without one
  (toy runs) get the gin record alone.
  """
  record = gin_checks.run_record()
  data, model = build(data_binding), build(f"{entry}.model")
  if data is None:
    return record
  tokenizer = data.tokenizer()
  with open(data.tokenizer_file, "rb") as f:
    record["tokenizer.sha256"] = hashlib.sha256(f.read()).hexdigest()
  record["tokenizer.vocab_size"] = str(tokenizer.vocab_size)
  if model is not None:
    model.check_vocab(tokenizer.vocab_size, where=data.tokenizer_file)
  return record


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser after the `--gin.` rewrite; returns the remaining argv."""
  return app.parse_flags_with_usage(rewrite_gin_args(argv))


def run(main: Callable[[Sequence[str]], object]) -> None:
  """`app.run(main)` with the `--gin.` rewrite (`main`'s return value is ignored:
  app.run would pass a non-None one to sys.exit)."""
  app.run(lambda argv: main(argv) and None, flags_parser=parse_flags)
