"""Pretrained towers -> one PixelLLM init checkpoint (the `train(init_checkpoint=DIR)` format).

`python -m pixelllm_jax.convert` (see `__main__.py`) runs `assemble`:
1. the model is built from its gin config and initialized *abstractly* (`jax.eval_shape`: a
   paper-scale model is never materialized), giving the composer's parameter shapes;
2. each given source is converted with the existing importers into the composer's submodule
   trees: 't5' (Hugging Face T5 directory / weight file, or a classic T5X checkpoint; `t5.py`),
   'eva02' (timm EVA02 state dict; `eva02.py`), 'sam' and 'prompt_encoder' (an original
   segment-anything `.pth`, or a Hugging Face `SamModel` directory; `sam.py`, imported only
   when a SAM source is given). The importers are run against the model config's own tower
   configs, so their own checks (missing keys, shape mismatches, unused source keys) already
   speak in terms of this model;
3. every converted leaf is checked again against the composer's shapes (`check_against_model`):
   missing leaves, leaves the model lacks and shape mismatches are collected into one
   `AssemblyError` naming every offending key;
4. where the T5 config has LoRA, fresh adapters are added (`common.with_fresh_lora`: lora_a
   from the layer's init, lora_b = 0, so the adapted model computes exactly the imported one);
5. the tree (only the converted submodules) is written with `train.checkpoint.save_params`.
   Submodules the checkpoint does not cover (extractor, visual_proj, loc_head, and any tower
   without a source) keep their fresh initialization when `train` loads it.

Config checks that shapes cannot catch: for a Hugging Face T5, `config.json` must agree with the
model's `T5Config` on `num_heads`, `d_kv`, `feed_forward`, `tie_word_embeddings` and
`relative_attention_max_distance` (a differing value changes the math without changing any
shape); the sizes themselves are checked through the parameter shapes.

Memory: the converted arrays are float32 numpy (Flan-T5-XL alone is 11.4 GB); nothing is put on
an accelerator. The adapters are computed by a jitted init that returns only the adapter leaves
(XLA drops the rest), so the base model is never initialized.
"""
import dataclasses
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixelllm_jax import lora as lora_lib
from pixelllm_jax.convert import common
from pixelllm_jax.models import t5 as t5_model
from pixelllm_jax.model import PixelLLMModel
from pixelllm_jax.models.pixel_llm import PixelLLMConfig

T5_FORMATS = ("hf", "t5x")
SAM_FORMATS = ("auto", "original", "hf")
# T5Config fields that change the computation without changing any parameter shape.
_T5_MATH_FIELDS = ("num_heads", "d_kv", "feed_forward", "tie_word_embeddings",
                   "relative_attention_max_distance")


class AssemblyError(ValueError):
  """Converted trees do not fit the model; the message names every offending key."""


@dataclasses.dataclass(frozen=True)
class Sources:
  """Where the pretrained towers come from (None: that tower keeps its fresh init)."""
  t5: str | None = None
  t5_format: str = "hf"
  sam: str | None = None
  sam_format: str = "auto"
  eva02: str | None = None

  def __post_init__(self):
    if self.t5_format not in T5_FORMATS:
      raise ValueError(f"t5_format must be one of {T5_FORMATS}, got {self.t5_format!r}")
    if self.sam_format not in SAM_FORMATS:
      raise ValueError(f"sam_format must be one of {SAM_FORMATS}, got {self.sam_format!r}")


@dataclasses.dataclass
class Assembled:
  """The checkpoint tree and what went into it."""
  params: dict[str, Any]                      # {'t5': ..., 'sam': ..., ...} numpy float32
  reports: dict[str, common.ConversionReport]  # per source ('t5', 'eva02', 'sam')
  converted_leaves: dict[str, int]            # per submodule: leaves taken from a source
  lora_leaves: int = 0                        # fresh adapter leaves added under 't5'
  model_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

  def summary_rows(self) -> list[tuple]:
    """(submodule, converted leaves, params in the checkpoint, params in the model)."""
    model_shapes, rows = self.model_shapes, []
    for name in sorted({p.split("/", 1)[0] for p in model_shapes}):
      in_model = sum(int(np.prod(s)) for p, s in model_shapes.items()
                     if p.split("/", 1)[0] == name)
      tree = self.params.get(name)
      in_ckpt = sum(int(np.size(x)) for x in jax.tree.leaves(tree)) if tree is not None else 0
      rows.append((name, self.converted_leaves.get(name, 0), in_ckpt, in_model))
    return rows


# ---- the model's shapes ------------------------------------------------------------------------


def abstract_params(model: PixelLLMModel) -> dict[str, Any]:
  """The composer's params as a nested dict of ShapeDtypeStructs (nothing allocated)."""
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), model.abstract_batch()))


def model_shapes(model: PixelLLMModel) -> dict[str, tuple[int, ...]]:
  """Flat {'sub/…/leaf': shape} of the composer's params."""
  return {p: tuple(x.shape) for p, x in common.flatten_params(abstract_params(model)).items()}


# ---- per-source conversion ---------------------------------------------------------------------


def _t5_config_mismatches(directory: str, config: t5_model.T5Config) -> list[str]:
  from pixelllm_jax.convert import t5 as convert_t5  # pylint: disable=import-outside-toplevel
  source = convert_t5.hf_config_to_t5(convert_t5.read_hf_config(directory))
  return [f"T5Config.{name}: checkpoint config.json has {getattr(source, name)!r}, "
          f"the model {getattr(config, name)!r}"
          for name in _T5_MATH_FIELDS if getattr(source, name) != getattr(config, name)]


def convert_t5(path: str, fmt: str, config: t5_model.T5Config
               ) -> tuple[dict, common.ConversionReport]:
  """Base (LoRA-free) T5 params for `config` from a Hugging Face or T5X checkpoint."""
  from pixelllm_jax.convert import t5 as convert_t5  # pylint: disable=import-outside-toplevel
  common.require_path(path, "--t5")
  if fmt == "t5x":
    return convert_t5.load_t5x_checkpoint(path, config, return_report=True)
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  mismatches = _t5_config_mismatches(directory, config)
  if mismatches:
    raise AssemblyError(f"{path}: config.json disagrees with the model's T5 config:\n  "
                        + "\n  ".join(mismatches))
  # Every T5Config field from the model: the converter's shape checks then speak for it.
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  params, _, report = convert_t5.load_hf_t5(path, return_report=True, **fields)
  return params, report


def convert_eva02(path: str, config) -> tuple[dict, common.ConversionReport]:
  from pixelllm_jax.convert import eva02 as convert_eva  # pylint: disable=import-outside-toplevel
  return convert_eva.load_timm_eva02(path, config, return_report=True)


def convert_sam(path: str, fmt: str, config: PixelLLMConfig
                ) -> tuple[dict[str, dict], common.ConversionReport]:
  """({submodule: params}, report) from a SAM checkpoint: 'sam' (the image encoder) and
  'prompt_encoder', and 'mask_decoder' when the model has a mask head (referring
  segmentation starts from SAM's decoder, frozen, as the official refseg configs).

  `fmt` 'auto': a directory is a Hugging Face SamModel, a file the original `.pth`.
  Without a mask head the mask decoder's keys are reported as ignored.
  """
  try:
    from pixelllm_jax.convert import sam as convert_sam  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # the SAM importer is optional
    raise AssemblyError(f"--sam given but the SAM importer is unavailable: {e}") from e
  if config.sam is None:
    raise AssemblyError("--sam given but the model config has no SAM tower (PixelLLMConfig.sam)")
  if fmt == "auto":
    fmt = "hf" if os.path.isdir(path) else "original"
  components = ("image_encoder", "prompt_encoder")
  decoder = convert_sam.MaskDecoderConfig()
  if config.mask_head is not None:
    components += ("mask_decoder",)
    decoder = config.mask_head.decoder
  configs = convert_sam.SamConfigs(image_encoder=config.sam,
                                   prompt_encoder=config.prompt_encoder, mask_decoder=decoder)
  state_dict = common.load_state_dict(path)
  fn = convert_sam.convert_hf_sam if fmt == "hf" else convert_sam.convert_original_sam
  out = fn(state_dict, configs, components=components)
  trees = {"sam": out.image_encoder, "prompt_encoder": out.prompt_encoder}
  if "mask_decoder" in components:
    trees["mask_decoder"] = out.mask_decoder
  return trees, out.report


# ---- checks and LoRA ---------------------------------------------------------------------------


def check_against_model(trees: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *,
                        skip_lora: bool = True) -> None:
  """Every leaf of every converted submodule must exist in the model with the same shape, and
  every model leaf of those submodules must be filled (adapters excepted when `skip_lora`).
  Raises one AssemblyError listing all offending keys."""
  flat = {}
  for name, tree in trees.items():
    flat.update({f"{name}/{p}": v for p, v in common.flatten_params(tree).items()})
  covered = tuple(f"{name}/" for name in trees)
  missing = sorted(p for p in shapes if p.startswith(covered) and p not in flat
                   and not (skip_lora and lora_lib.is_lora_path(p)))
  unknown = sorted(p for p in flat if p not in shapes)
  mismatched = sorted(f"{p}: converted {tuple(np.shape(v))}, model {shapes[p]}"
                      for p, v in flat.items() if p in shapes and tuple(np.shape(v)) != shapes[p])
  problems = [f"{title} ({len(keys)}): {', '.join(keys)}" for title, keys in (
      ("model parameters no source fills", missing), ("not in the model", unknown),
      ("shape mismatches", mismatched)) if keys]
  if problems:
    raise AssemblyError("converted weights do not fit the model:\n  " + "\n  ".join(problems))


def fresh_lora(config: t5_model.T5Config, seed: int = 0) -> dict[str, np.ndarray]:
  """{path: array} of the adapter leaves of a fresh `T5(config)` init (base never allocated)."""
  model = t5_model.T5(config)
  args = (jnp.zeros((1, 1, config.d_model)), jnp.ones((1, 1), bool), jnp.zeros((1, 1), jnp.int32))

  def init(key):
    params = nn.meta.unbox(model.init(key, *args)["params"])
    return {p: v for p, v in common.flatten_params(params).items() if lora_lib.is_lora_path(p)}

  return {p: np.asarray(v) for p, v in jax.jit(init)(jax.random.key(seed)).items()}


def add_fresh_lora(t5_params: Mapping[str, Any], t5_shapes: Mapping[str, tuple[int, ...]],
                   config: t5_model.T5Config, seed: int = 0) -> dict:
  """`common.with_fresh_lora` on the T5 subtree without initializing the base: the template's
  non-adapter leaves are zero-stride views (no memory), replaced by the imported arrays."""
  lora = fresh_lora(config, seed)
  template = {p: lora[p] if p in lora else np.broadcast_to(np.zeros((), np.float32), shape)
              for p, shape in t5_shapes.items()}
  out = common.with_fresh_lora(t5_params, common.unflatten_params(template))
  return jax.tree.map(np.asarray, out)


# ---- the whole thing ---------------------------------------------------------------------------


def assemble(model: PixelLLMModel, sources: Sources, *, seed: int = 0) -> Assembled:
  """Converts every given source into the composer's trees, checked, with fresh LoRA."""
  cfg = model.config
  shapes = model_shapes(model)
  trees, reports = {}, {}
  if sources.t5:
    trees["t5"], reports["t5"] = convert_t5(sources.t5, sources.t5_format, cfg.t5)
  if sources.eva02:
    if cfg.eva02 is None:
      raise AssemblyError("--eva02 given but the model config has no EVA02 tower")
    trees["eva02"], reports["eva02"] = convert_eva02(sources.eva02, cfg.eva02)
  if sources.sam:
    sam_trees, reports["sam"] = convert_sam(sources.sam, sources.sam_format, cfg)
    trees.update(sam_trees)
  if not trees:
    raise AssemblyError("nothing to convert: give at least one of --t5, --sam, --eva02")
  check_against_model(trees, shapes)
  converted = {name: len(jax.tree.leaves(tree)) for name, tree in trees.items()}
  lora_leaves = 0
  if "t5" in trees and cfg.t5.lora.rank > 0:
    t5_shapes = {p.split("/", 1)[1]: s for p, s in shapes.items() if p.startswith("t5/")}
    trees["t5"] = add_fresh_lora(trees["t5"], t5_shapes, cfg.t5, seed)
    lora_leaves = sum(1 for p in t5_shapes if lora_lib.is_lora_path(p))
  check_against_model(trees, shapes, skip_lora=False)
  return Assembled(params=trees, reports=reports, converted_leaves=converted,
                   lora_leaves=lora_leaves, model_shapes=shapes)


def format_summary(assembled: Assembled) -> str:
  """A table: per submodule, leaves converted, params written, params in the model."""
  header = ("submodule", "converted leaves", "params written", "params in model")
  lines = [f"{header[0]:<16}" + "".join(f"{h:>18}" for h in header[1:])]
  shapes = assembled.model_shapes
  for name, leaves, written, in_model in assembled.summary_rows():
    note = "" if written else "   (fresh init at train time)"
    lines.append(f"{name:<16}{leaves:>18,}{written:>18,}{in_model:>18,}{note}")
  if assembled.lora_leaves:
    lora = sum(int(np.prod(s)) for p, s in shapes.items()
               if p.startswith("t5/") and lora_lib.is_lora_path(p))
    lines.append(f"t5: {assembled.lora_leaves} fresh LoRA leaves ({lora:,} params, lora_b = 0)")
  for name, report in assembled.reports.items():
    lines.append(f"{name}: {report.summary()}")
    by_reason: dict[str, list[str]] = {}
    for key, why in sorted(report.ignored.items()):
      by_reason.setdefault(why, []).append(key)
    for why, keys in by_reason.items():
      more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
      lines.append(f"  ignored {keys[0]}{more} ({why})")
    for key in report.unused:
      lines.append(f"  unused {key}")
    for note in report.notes:
      lines.append(f"  note: {note}")
  return "\n".join(lines)
