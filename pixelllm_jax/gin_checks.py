"""Start-up checks of a parsed gin configuration (gin's edge, with cli.py and configurables.py).

They run before any data is prepared or anything compiled:
- `unknown_macros`: a command-line binding of a macro no config file defines or uses
  (`--gin.TRAIN_STEP=30` for TRAIN_STEPS) would silently create a new macro;
- `missing_required`: `%gin.REQUIRED` macros an entry point (train, evaluate) would receive
  (gin passes the REQUIRED marker on as a value, which fails much later, e.g. a TypeError
  after data preparation when MODEL_DIR is missing);
- `run_record`: the bindings that determine results, macros resolved, for
  `train/run_record.py`: everything except what only says where things live or how the run
  is laid out and logged (`OPERATIONAL`).

The bindings are read from `gin.config_str()`: one `name = value` line per binding (long values
continue on following lines), macros bare (`TRAIN_STEPS = 6800`) and referenced as `%NAME`.
"""
import difflib
import re
from typing import Iterable

import gin

# Bindings that never change results. Prefixes of binding names.
OPERATIONAL = (
    "train.model_dir", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.init_checkpoint", "train.max_nonfinite_steps", "train.partitioner",
    "train_data.num_threads", "Partitioner.", "RematPolicy.", "DataConfig.manual_dir",
    "DataConfig.data_dir", "DataConfig.tokenizer_path", "evaluate.",
)
# Configurables that describe the model an evaluation reads (checked by `evaluate` too).
MODEL = ("PixelLLMModel.config", "PixelLLMModel.dtype", "PixelLLMConfig.", "T5Config.",
         "t5_1_1_config.", "LoraConfig.", "EVA02Config.", "SamViTConfig.",
         "PromptEncoderConfig.", "PromptExtractorConfig.", "LocHeadConfig.", "DtypePolicy.",
         "TaskConfig.", "DataConfig.extra_ids", "tokenizer.")
_MACRO_REF = re.compile(r"%([A-Za-z_][\w.]*)")
_CONFIGURABLE_REF = re.compile(r"@([\w./]+)")
_REQUIRED = "%gin.REQUIRED"


def bindings() -> dict[str, str]:
  """{binding name: value text} of the current gin configuration (macros included)."""
  out, name, value = {}, None, []
  for line in gin.config_str().splitlines():
    if line.startswith("#") or not line.strip():
      continue
    if name is not None and (line.startswith(" ") or value[-1].endswith("\\")):
      value.append(line.strip())
      continue
    if name is not None:
      out[name] = " ".join(v.rstrip("\\").strip() for v in value)
    name, _, first = line.partition(" = ")
    name, value = name.strip(), [first.strip()]
  if name is not None:
    out[name] = " ".join(v.rstrip("\\").strip() for v in value)
  return {k: v for k, v in out.items() if not k.startswith("import ")}


def _is_macro(name: str) -> bool:
  return "." not in name and "/" not in name


def known_macros(config: dict[str, str]) -> set[str]:
  """Macros the configuration defines or uses."""
  defined = {k for k in config if _is_macro(k)}
  used = {m for v in config.values() for m in _MACRO_REF.findall(v)}
  return (defined | used) - {"gin.REQUIRED"}


def unknown_macros(command_line_bindings: Iterable[str], known: set[str]) -> list[str]:
  """Messages for command-line bindings of macros the files neither define nor use (nor
  another command-line binding: `--gin.LR=1e-3 --gin.make_optimizer.learning_rate=%LR`)."""
  command_line_bindings = list(command_line_bindings)
  known = known | {m for b in command_line_bindings if "=" in b
                   for m in _MACRO_REF.findall(b.split("=", 1)[1])}
  problems = []
  for binding in command_line_bindings:
    name = binding.split("=", 1)[0].strip()
    if _is_macro(name) and name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=1)
      hint = f"; did you mean {close[0]}?" if close else ""
      problems.append(f"--gin.{name}: no config file defines or uses the macro {name}{hint}")
  return problems


def _configurable(ref: str) -> str:
  """'@scope/module.Name()' -> 'Name'."""
  return ref.rstrip("()").split("/")[-1].split(".")[-1]


def missing_required(entry: str, config: dict[str, str] | None = None) -> list[str]:
  """The `%gin.REQUIRED` macros reachable from `entry`'s bindings."""
  config = bindings() if config is None else config
  seen, queue, missing = set(), [("configurable", entry)], []
  while queue:
    kind, name = queue.pop()
    if (kind, name) in seen or name == "gin.REQUIRED":
      continue
    seen.add((kind, name))
    if kind == "macro":
      value = config.get(name, "")
      if value == _REQUIRED:
        missing.append(name)
      values = [value]
    else:
      values = [v for k, v in config.items() if k.split("/")[-1].startswith(name + ".")]
    for value in values:
      queue += [("macro", m) for m in _MACRO_REF.findall(value)]
      queue += [("configurable", _configurable(r)) for r in _CONFIGURABLE_REF.findall(value)]
  return sorted(set(missing))


def resolve(value: str, config: dict[str, str], depth: int = 0) -> str:
  """`value` with every `%MACRO` replaced by the macro's (resolved) value."""
  if depth > 20:
    raise ValueError(f"gin macros nest too deep (a cycle?) in {value!r}")
  return _MACRO_REF.sub(
      lambda m: (m.group(0) if m.group(1) == "gin.REQUIRED"
                 else resolve(config.get(m.group(1), m.group(0)), config, depth + 1)), value)


def run_record(config: dict[str, str] | None = None) -> dict[str, str]:
  """The bindings that determine results, macros resolved (see the module docstring)."""
  config = bindings() if config is None else config
  return {name: resolve(value, config) for name, value in config.items()
          if not _is_macro(name) and not name.startswith(OPERATIONAL)}


def model_keys(record: dict[str, str]) -> list[str]:
  """The keys of `record` that describe the model."""
  return sorted(k for k in record if k.startswith(MODEL))
