"""Gin only at the edges: library code builds no gin-configurable object.

- No library module imports gin except the two edge modules (configurables.py, cli.py).
- With a gin binding active for a field of every registered config, building the library
  class bare still gives its default (nothing reads gin behind the caller's back), while gin
  builds the bound value, as the plain class (not a gin subclass).
- A misspelt parameter is refused when the binding is parsed.
- Parsing the shipped run files logs no error (gin's include probes are not errors).
"""
import ast
import dataclasses
import logging
import os

import gin
import pytest

from pixelllm_jax import cli, configurables

PACKAGE = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "pixelllm_jax"))
EDGES = {"configurables.py", "cli.py", "gin_checks.py", "convert/__main__.py"}


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        yield os.path.relpath(path, PACKAGE), path


def _imports_gin(path: str) -> bool:
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "gin" for a in node.names):
      return True
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gin":
      return True
  return False


def test_only_the_edges_import_gin():
  modules = dict(_modules())
  assert len(modules) > 50 and "configurables.py" in modules
  offenders = sorted(rel for rel, path in modules.items()
                     if rel not in EDGES and _imports_gin(path))
  assert not offenders, f"library modules importing gin: {offenders}"


def _defaulted_field(cls):
  """(name, a value different from the default) for one simple defaulted field of `cls`."""
  for field in dataclasses.fields(cls):
    if field.default is dataclasses.MISSING or not field.init:
      continue
    default = field.default
    if isinstance(default, bool):
      return field.name, not default
    if isinstance(default, int):
      return field.name, default + 3
    if isinstance(default, float):
      return field.name, default + 0.5
  return None


def _bare_constructible(cls) -> bool:
  return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
             for f in dataclasses.fields(cls) if f.init)


# Registered dataclasses that build with no arguments and have a numeric or bool field to bind.
DATACLASSES = sorted(name for name, (target, _) in configurables.REGISTERED.items()
                     if dataclasses.is_dataclass(target) and _bare_constructible(target)
                     and _defaulted_field(target))


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_the_config_classes_are_covered():
  assert {"LoraConfig", "TaskConfig", "LossConfig", "EVA02Config", "SamViTConfig",
          "PromptEncoderConfig", "PromptExtractorConfig", "LocHeadConfig",
          "MaskDecoderConfig"} <= set(DATACLASSES)


@pytest.mark.parametrize("name", DATACLASSES)
def test_bare_construction_ignores_gin_bindings(clean_gin, name):
  target, factory = configurables.REGISTERED[name]
  field, value = _defaulted_field(target)
  gin.parse_config(f"{name}.{field} = {value!r}")
  bare, built = target(), factory()
  assert getattr(bare, field) != value, f"bare {name}() read the gin binding of {field}"
  assert getattr(built, field) == value
  assert type(built) is target  # the plain class, not a gin subclass


def test_gin_built_lora_config_is_the_plain_class(clean_gin):
  from pixelllm_jax.lora import LoraConfig
  gin.parse_config("LoraConfig.rank = 32")
  built = configurables.REGISTERED["LoraConfig"][1]()
  assert built == LoraConfig(rank=32) and LoraConfig().rank == 0


def test_misspelt_parameter_is_refused_at_parse_time(clean_gin):
  with pytest.raises(ValueError, match="doesn't have a parameter named 'rnak'"):
    gin.parse_config("LoraConfig.rnak = 3")
  with pytest.raises(ValueError, match="num_step"):
    gin.parse_config("train.num_step = 3")


def test_parsing_the_shipped_runs_logs_no_error(clean_gin, caplog):
  caplog.set_level(logging.INFO)
  cli.parse_gin(["runs/demo.gin"], ["MODEL_DIR = '/tmp/never'"])
  cli.parse_gin(["runs/refcoco_t5_xl.gin"], ["MODEL_DIR = '/tmp/never'"])
  errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert not errors


def test_includes_resolve_with_a_runs_folder_in_the_working_directory(clean_gin, tmp_path,
                                                                      monkeypatch):
  """The demo writes runs/<model dir>; evaluating from there must still find runs/train.gin
  (gin's package probe used to crash on the namespace package `runs`)."""
  (tmp_path / "runs" / "demo").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  cli.parse_gin(["runs/demo.gin"], ["MODEL_DIR = 'runs/demo'"])
  assert gin.query_parameter("evaluate.model_dir") is not None
