"""Shared pieces of the weight importers: reading state dicts, accounting for every key, nesting.

- `load_state_dict(path)`: a file (`.safetensors`, or `.bin` / `.pth` / `.pt` / `.ckpt` through
  `torch.load(weights_only=True)`) or a Hugging Face model directory (`model.safetensors`, a sharded
  `model.safetensors.index.json`, `pytorch_model.bin`, or `pytorch_model.bin.index.json`) ->
  `{name: np.ndarray}`. bfloat16 stays bfloat16 (`ml_dtypes`) until a converter casts it.
- `ConversionReport` + `Reader`: a converter takes tensors through a `Reader`, which records what
  it used and what was missing; `report.finish(expected_shapes)` adds shape mismatches and target
  parameters nobody produced, lists the unused source keys, logs a summary and raises one
  `ConversionError` naming every offending key (unused keys are errors too unless `strict=False`
  or the converter declared them ignorable).
- `flatten_params` / `unflatten_params` ('/'-joined paths <-> the nested dict flax uses),
  `expected_shapes(module, *init_args)` (abstract init, nothing is allocated).
- `with_fresh_lora(base_params, init_params)`: imported weights plus freshly initialized adapters.

Converters return plain nested dicts of float32 numpy arrays (no logical-axis boxes), ready for
`model.apply({'params': params}, ...)` or `train.checkpoint.save_params(path, params)`.
"""
import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from pixelllm_jax import lora as lora_lib

StateDict = dict[str, np.ndarray]
_log = logging.getLogger(__name__)

# Looked for, in this order, when `load_state_dict` is given a directory.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
_TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "module")


class SourceError(ValueError):
  """A source file or directory cannot be read; the message names it."""


def require_path(path: str, what: str) -> str:
  """`path` if it exists, else SourceError naming it and what it was given for."""
  if not os.path.exists(path):
    raise SourceError(f"{what} {path}: no such file or directory")
  return path


class ConversionError(ValueError):
  """A source does not fit the target model; `.report` holds the details."""

  def __init__(self, message: str, report: "ConversionReport"):
    super().__init__(message)
    self.report = report


# ---- reading ---------------------------------------------------------------------------------


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor / jax or numpy array as numpy (torch bfloat16 -> ml_dtypes.bfloat16)."""
  if hasattr(value, "detach"):  # torch tensor
    import torch  # pylint: disable=import-outside-toplevel
    tensor = value.detach().cpu()
    if tensor.dtype == torch.bfloat16:
      return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
  return np.asarray(value)


def _load_safetensors(path: str) -> StateDict:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(path, framework="np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _load_torch(path: str) -> StateDict:
  import torch  # pylint: disable=import-outside-toplevel
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: torch.load gave a {type(obj).__name__}, not a state dict")
  # Training checkpoints often wrap the weights: {'model': state_dict, 'optimizer': ...}.
  if not all(hasattr(v, "shape") for v in obj.values()):
    inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if not inner:
      raise ValueError(f"{path}: not a flat state dict and none of {_WRAPPER_KEYS} holds one "
                       f"(top-level keys: {sorted(obj)[:10]})")
    obj = obj[inner[0]]
  return {k: to_numpy(v) for k, v in obj.items()}


def _load_file(path: str) -> StateDict:
  require_path(path, "weight file")
  if not path.endswith((".safetensors", *_TORCH_SUFFIXES)):
    raise SourceError(f"{path}: unknown weight file type (want .safetensors, "
                      f"{', '.join(_TORCH_SUFFIXES)} or a *.index.json)")
  try:
    return _load_safetensors(path) if path.endswith(".safetensors") else _load_torch(path)
  except SourceError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (corrupt, truncated, not weights)
    raise SourceError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from e


def _load_sharded(index_path: str) -> StateDict:
  with open(index_path) as f:
    weight_map = json.load(f)["weight_map"]
  base = os.path.dirname(index_path)
  out: StateDict = {}
  for shard in sorted(set(weight_map.values())):
    out.update(_load_file(os.path.join(base, shard)))
  absent = sorted(k for k in weight_map if k not in out)
  if absent:
    raise ValueError(f"{index_path}: keys listed in weight_map but in no shard: {absent}")
  return out


def find_weight_file(directory: str) -> str:
  """The first of `HF_WEIGHT_FILES` present in `directory` (FileNotFoundError if none)."""
  for name in HF_WEIGHT_FILES:
    candidate = os.path.join(directory, name)
    if os.path.isfile(candidate):
      return candidate
  raise SourceError(f"{directory}: none of the weight files {HF_WEIGHT_FILES}")


def load_state_dict(path: str) -> StateDict:
  """Reads weights from a file or a Hugging Face model directory (see the module docstring)."""
  path = require_path(os.fspath(path), "weights")
  if os.path.isdir(path):
    path = find_weight_file(path)
  if path.endswith(".index.json"):
    return _load_sharded(path)
  return _load_file(path)


# ---- accounting ------------------------------------------------------------------------------


@dataclasses.dataclass
class ConversionReport:
  """What a conversion consumed, skipped and could not place.

  source_keys: every key the source offered. used: keys consumed. ignored: keys deliberately
  skipped, with the reason. unused: source keys neither used nor ignored (filled by `finish`).
  missing / mismatched / unexpected: human-readable entries naming the offending keys.
  notes: substitutions and defaults worth knowing about (not errors).
  """

  source: str = "source"
  source_keys: set[str] = dataclasses.field(default_factory=set)
  used: set[str] = dataclasses.field(default_factory=set)
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)
  unused: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  mismatched: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  origins: dict[str, str] = dataclasses.field(default_factory=dict)  # target path -> source key

  def errors(self, strict: bool = True) -> list[str]:
    """One line per category of problem, each naming all of its keys."""
    groups = [("missing", self.missing), ("shape mismatches", self.mismatched),
              ("not representable / not in the model", self.unexpected)]
    if strict:
      groups.append(("unused source keys", self.unused))
    return [f"{title} ({len(keys)}): {', '.join(keys)}" for title, keys in groups if keys]

  def summary(self) -> str:
    return (f"{self.source}: used {len(self.used)} of {len(self.source_keys)} keys, "
            f"ignored {len(self.ignored)}, unused {len(self.unused)}, missing {len(self.missing)}, "
            f"mismatched {len(self.mismatched)}, unexpected {len(self.unexpected)}")

  def raise_if_errors(self, strict: bool = True) -> None:
    errors = self.errors(strict)
    if errors:
      raise ConversionError(
          f"{self.source} does not fit the target model:\n  " + "\n  ".join(errors), self)

  def finish(self, params: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *,
             strict: bool = True) -> None:
    """Checks flat `params` against flat `expected` shapes, lists unused keys, logs, raises."""
    for path, shape in expected.items():
      if path not in params:
        self.missing.append(f"{path} (target parameter no source key fills)")
      elif params[path] is None:
        continue  # its source key is already listed as missing
      elif tuple(params[path].shape) != tuple(shape):
        origin = f" (from {self.origins[path]})" if path in self.origins else ""
        self.mismatched.append(f"{path}{origin}: source gives {tuple(params[path].shape)}, "
                               f"model wants {tuple(shape)}")
    self.unexpected.extend(f"{p} (produced, but the model has no such parameter)"
                           for p in params if p not in expected)
    self.unused = sorted(self.source_keys - self.used - set(self.ignored))
    _log.info("%s", self.summary())
    for key in self.unused:
      _log.warning("%s: unused key %s", self.source, key)
    for key, why in sorted(self.ignored.items()):
      _log.info("%s: ignored %s (%s)", self.source, key, why)
    for note in self.notes:
      _log.info("%s: %s", self.source, note)
    self.raise_if_errors(strict)


class Reader:
  """Takes arrays out of a source mapping, recording used and missing keys in a report."""

  def __init__(self, source: Mapping[str, Any], report: ConversionReport):
    self.source = source
    self.report = report
    report.source_keys.update(source.keys())

  def has(self, key: str) -> bool:
    return key in self.source

  def get(self, key: str, transform: Callable[[np.ndarray], np.ndarray] | None = None,
          *, target: str = "") -> np.ndarray | None:
    """float32 array of `key` (after `transform`), or None and a `missing` entry."""
    if key not in self.source:
      self.report.missing.append(f"{key} (for {target})" if target else key)
      return None
    self.report.used.add(key)
    if target:
      self.report.origins[target] = key
    value = np.asarray(to_numpy(self.source[key]), dtype=np.float32)
    if transform is None:
      return value
    try:
      return transform(value)
    except (ValueError, IndexError, TypeError) as e:  # e.g. a tensor of the wrong rank
      self.report.mismatched.append(
          f"{key} {tuple(value.shape)}{f' (for {target})' if target else ''}: cannot be "
          f"converted ({type(e).__name__}: {e})")
      return None

  def ignore(self, key: str, reason: str) -> None:
    if key in self.source:
      self.report.ignored[key] = reason


# ---- param trees -----------------------------------------------------------------------------


def flatten_params(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Nested dict (boxes unwrapped) -> {'a/b/c': leaf}."""
  out = {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(tree)):
    out[sep.join(str(getattr(k, "key", k)) for k in key_path)] = leaf
  return out


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dict (skips None leaves)."""
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    if leaf is None:
      continue
    *parents, name = path.split(sep)
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf
  return out


def expected_shapes(module: nn.Module, *init_args: Any, **init_kwargs: Any
                    ) -> dict[str, tuple[int, ...]]:
  """Flat {path: shape} of `module`'s 'params' from an abstract init (nothing allocated)."""
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), *init_args, **init_kwargs)["params"])
  return {p: tuple(s.shape) for p, s in flatten_params(shapes).items()}


def with_fresh_lora(base_params: Mapping[str, Any], init_params: Mapping[str, Any]) -> Any:
  """`init_params` (a fresh init of the model with LoRA) with every base leaf put in.

  Imported checkpoints have no adapters: the result keeps `init_params`' lora_a and sets every
  lora_b to zero, so it computes exactly what `base_params` computes in the model without LoRA.
  `init_params` may be boxed (nn.LogicallyPartitioned); boxes are kept. Raises ValueError naming
  the base leaves the model lacks or whose shapes differ, and the non-adapter model leaves the
  base does not fill.
  """
  base = {p: v for p, v in flatten_params(base_params).items()}
  init_flat = jax.tree_util.tree_flatten_with_path(
      init_params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  leaves, treedef = init_flat
  paths = ["/".join(str(getattr(k, "key", k)) for k in kp) for kp, _ in leaves]
  problems = [f"{p} (not in the model)" for p in base if p not in paths]
  out = []
  for path, (_, leaf) in zip(paths, leaves):
    value = leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf
    if path in base:
      new = np.asarray(base[path], dtype=np.asarray(value).dtype)
      if new.shape != tuple(value.shape):
        problems.append(f"{path}: base {new.shape}, model {tuple(value.shape)}")
    elif path.rsplit("/", 1)[-1] == "lora_b":
      new = np.zeros(value.shape, np.asarray(value).dtype)
    elif lora_lib.is_lora_path(path):
      new = value
    else:
      problems.append(f"{path} (model parameter the base does not fill)")
      new = value
    out.append(leaf.replace_boxed(new) if isinstance(leaf, nn.meta.AxisMetadata) else new)
  if problems:
    raise ValueError("with_fresh_lora: base params do not fit the model:\n  "
                     + "\n  ".join(problems))
  return jax.tree_util.tree_unflatten(treedef, out)


def take_all(reader: Reader, rules: Iterable[tuple[str, str, Callable | None]]
             ) -> dict[str, np.ndarray | None]:
  """Applies (target_path, source_key, transform) rules: {target_path: array or None}."""
  return {target: reader.get(key, transform, target=target) for target, key, transform in rules}
