"""Pretrained T5 / Flan-T5 weights -> `pixelllm_jax.models.t5.T5` params.

Sources:
- Hugging Face `T5ForConditionalGeneration` (T5 v1.0, v1.1, Flan-T5, mT5): `t5_params_from_hf`
  maps a state dict (names listed in `models/t5.py`'s docstring; torch Linear weights and the
  relative-attention tables are transposed); `load_hf_t5(path)` reads `config.json` plus
  `model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin` (or a
  single weight file given directly, with its `config.json` beside it).
- T5X checkpoints: `load_t5x_checkpoint(path, config)` reads the classic T5X layout (t5x
  `checkpoints.Checkpointer`, checkpoint format version 2/3, the one the public
  `gs://t5-data/pretrained_models/t5x/...` checkpoints use), copied to a local directory:
    checkpoint_<step>/checkpoint   flax msgpack of {'version': 3, 'optimizer': {'target': params,
                                   'state': {'step', 'param_states'}}}; each leaf is either the
                                   array itself (unpartitioned) or the JSON of a TensorStore spec
                                   {'driver': 'zarr', 'dtype', 'kvstore': {'driver': 'file' | 'gcs',
                                   'path': 'target.encoder.layers_0.attention.key.kernel'},
                                   'metadata': {'shape', 'chunks', 'compressor': gzip}} whose path
                                   is relative to the checkpoint directory (older files put 'path'
                                   beside 'kvstore'; a gcs driver's dummy bucket is ignored).
    checkpoint_<step>/target.<param path with '.'>/   one zarr array per parameter.
  Only 'target' is read (optimizer state is skipped); t5x parameter names and shapes are ours
  (examples/t5/network.py, unscanned layers: 2-D joined-kv kernels, rel_embedding [H, buckets]).
  Not supported: the scanned `scalable_t5` layout, the Orbax/OCDBT format of recent t5x, and the
  old Mesh TensorFlow checkpoints (t5x's own importer turns those into the layout above).

Every conversion accounts for each key (`convert.common.ConversionReport`): missing keys, shape
mismatches, and source keys it did not use (unless `strict=False`) raise one `ConversionError`
listing all of them. Deliberately ignored (reported as ignored, not errors): the
`decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight` some old HF checkpoints
carry (T5 has no bias in cross-attention; transformers drops it too), and `encoder.embed_tokens`
/ `decoder.embed_tokens` / a tied `lm_head` when they equal `shared.weight` (our T5 has one token
table; a differing copy is an error).

Tied vs untied logits (Hugging Face config -> `T5Config.tie_word_embeddings`): the original T5
(`tie_word_embeddings` true or absent) scales the decoder output by d_model**-0.5 and reads
logits from the embedding; v1.1 / Flan-T5 (`tie_word_embeddings: false`) has a separate
`lm_head`. transformers 5.x writes `scale_decoder_outputs` for this and may keep the weights tied
even when it is false; that key wins when present, and a missing `lm_head.weight` with tied
weights is filled from `shared.weight` (a note in the report).

LoRA: no source has adapters. The converters produce the base model; for a config with LoRA,
`with_fresh_lora(base, fresh_init)` adds fresh adapters (lora_b = 0, so outputs are unchanged).
For training, `save_params(dir, {'t5': params})` and `train(init_checkpoint=dir)` also works: leaves
the checkpoint lacks (the adapters, the other towers) keep their initialization.

Usage (logits for token ids from an imported Flan-T5):

    import jax.numpy as jnp
    from pixelllm_jax.convert.t5 import load_hf_t5
    from pixelllm_jax.models.t5 import T5

    params, config = load_hf_t5("/path/to/flan-t5-xl")   # a save_pretrained / hub snapshot dir
    model, variables = T5(config), {"params": params}
    tokens = jnp.array([[363, 19, 8, 1784, 13, 1473, 58, 1]])       # T5 sentencepiece ids, eos 1
    mask = tokens != 0                                               # pad 0
    embeds = model.apply(variables, tokens, method=T5.embed)
    encoded = model.apply(variables, embeds, mask, method=T5.encode)
    decoder_input = jnp.array([[0, 1473]])                           # shift_right(labels), start 0
    logits, _ = model.apply(variables, encoded, mask, decoder_input, method=T5.decode)
"""
import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from pixelllm_jax.convert import common
from pixelllm_jax.convert.common import ConversionError, ConversionReport, with_fresh_lora
from pixelllm_jax.lora import LoraConfig
from pixelllm_jax.models import t5 as t5_model
from pixelllm_jax.models.t5 import T5Config

__all__ = ["t5_params_from_hf", "hf_config_to_t5", "load_hf_t5", "load_t5x_checkpoint",
           "t5_expected_shapes", "with_fresh_lora", "ConversionError", "ConversionReport"]

SHARED = "shared.weight"
EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
LM_HEAD = "lm_head.weight"
IGNORED_HF = {
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
        "T5 cross-attention has no position bias (transformers ignores this key too)",
}
HF_MODEL_TYPES = ("t5", "mt5")


def _transpose(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.T)


def t5_expected_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
  """Flat {path: shape} of the base (LoRA-free) `T5(config)` params."""
  base = dataclasses.replace(config, lora=LoraConfig(rank=0))
  return common.expected_shapes(
      t5_model.T5(base), jnp.zeros((1, 1, config.d_model)), jnp.ones((1, 1), bool),
      jnp.zeros((1, 1), jnp.int32))


def _hf_rules(cfg: T5Config) -> list[tuple[str, str, Any]]:
  """(our path, HF key, transform) for every parameter of the base T5."""
  rules = [("token_embedder/embedding", SHARED, None)]
  mlp = ("wi_0", "wi_1", "wo") if cfg.feed_forward == "gated-gelu" else ("wi", "wo")
  for stack, depth in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
    rules.append((f"{stack}/relpos_bias/rel_embedding",
                  f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  _transpose))
    if stack == "encoder":
      attentions = [("pre_attention_layer_norm", "attention", 0, "SelfAttention")]
    else:
      attentions = [("pre_self_attention_layer_norm", "self_attention", 0, "SelfAttention"),
                    ("pre_cross_attention_layer_norm", "encoder_decoder_attention", 1,
                     "EncDecAttention")]
    mlp_index = len(attentions)
    for i in range(depth):
      ours, hf = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
      for norm, attention, j, hf_attention in attentions:
        rules.append((f"{ours}/{norm}/scale", f"{hf}.{j}.layer_norm.weight", None))
        for proj, hf_proj in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
          rules.append((f"{ours}/{attention}/{proj}/kernel",
                        f"{hf}.{j}.{hf_attention}.{hf_proj}.weight", _transpose))
      rules.append((f"{ours}/pre_mlp_layer_norm/scale", f"{hf}.{mlp_index}.layer_norm.weight",
                    None))
      for name in mlp:
        rules.append((f"{ours}/mlp/{name}/kernel",
                      f"{hf}.{mlp_index}.DenseReluDense.{name}.weight", _transpose))
    rules.append((f"{stack}/{stack}_norm/scale", f"{stack}.final_layer_norm.weight", None))
  if not cfg.tie_word_embeddings:
    rules.append(("decoder/logits_dense/kernel", LM_HEAD, _transpose))
  return rules


def _check_alias(reader: common.Reader, key: str, why: str) -> None:
  """`key` must equal shared.weight; then it is consumed, else an error entry."""
  if not reader.has(key) or not reader.has(SHARED):
    return
  alias = common.to_numpy(reader.source[key])
  shared = common.to_numpy(reader.source[SHARED])
  if alias.shape == shared.shape and np.array_equal(alias, shared):
    reader.report.ignored[key] = "equals shared.weight"
  else:
    reader.report.used.add(key)  # examined; the error below names it
    reader.report.unexpected.append(f"{key} differs from {SHARED} ({why})")


def t5_params_from_hf(state_dict: Mapping[str, Any], config: T5Config, *, strict: bool = True,
                      return_report: bool = False, source: str = "Hugging Face T5 state dict"):
  """HF `T5ForConditionalGeneration` state dict (torch tensors or arrays) -> base T5 params.

  Returns a nested dict of float32 numpy arrays for `T5(config)` without LoRA (see
  `with_fresh_lora`), or `(params, report)` with `return_report=True`. Raises `ConversionError`
  listing every missing key, shape mismatch and (if `strict`) unused key.
  """
  report = ConversionReport(source=source)
  reader = common.Reader(state_dict, report)
  flat = common.take_all(reader, _hf_rules(config))
  for key in EMBED_ALIASES:
    _check_alias(reader, key, "this T5 has one token table for encoder, decoder and logits")
  if config.tie_word_embeddings:
    _check_alias(reader, LM_HEAD, "the config reads logits from the token embedding scaled by "
                 "d_model**-0.5; scaled logits from a separate lm_head are not representable")
  for key, why in IGNORED_HF.items():
    reader.ignore(key, why)
  report.finish(flat, t5_expected_shapes(config), strict=strict)
  params = common.unflatten_params(flat)
  return (params, report) if return_report else params


def hf_config_to_t5(hf: Mapping[str, Any], **overrides: Any) -> T5Config:
  """A Hugging Face T5 `config.json` dict -> `T5Config` (`overrides` replace any field)."""
  model_type = hf.get("model_type", "t5")
  if model_type not in HF_MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} is not a T5 this model reproduces "
                     f"(supported: {HF_MODEL_TYPES}; umt5 has per-layer position biases)")
  feed_forward = hf.get("feed_forward_proj", "relu")
  if feed_forward not in t5_model.FEED_FORWARDS:
    raise ValueError(f"feed_forward_proj {feed_forward!r} is not supported "
                     f"(supported: {t5_model.FEED_FORWARDS})")
  tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
  num_layers = hf["num_layers"]
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_heads=hf["num_heads"],
      d_kv=hf["d_kv"], d_ff=hf["d_ff"], num_encoder_layers=num_layers,
      num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6), feed_forward=feed_forward,
      tie_word_embeddings=bool(tied))
  return T5Config(**{**fields, **overrides})


def load_hf_t5(path_or_dir: str, *, strict: bool = True, return_report: bool = False,
               **config_overrides: Any):
  """Reads a Hugging Face T5 checkpoint: `(params, T5Config)` (+ report with `return_report`).

  `path_or_dir`: a model directory (config.json + weights, see the module docstring) or a single
  weight file with config.json beside it. `config_overrides` replace `T5Config` fields (e.g.
  `lora=LoraConfig(rank=32)`, `dropout_rate=0.1`, `dtype=jnp.bfloat16`); the params are always
  the base model's (add adapters with `with_fresh_lora`).
  """
  path_or_dir = common.require_path(os.fspath(path_or_dir), "T5 checkpoint")
  directory = path_or_dir if os.path.isdir(path_or_dir) else os.path.dirname(path_or_dir)
  hf = read_hf_config(directory)
  config = hf_config_to_t5(hf, **config_overrides)
  state_dict = common.load_state_dict(path_or_dir)
  notes = []
  weights_tied = hf.get("tie_word_embeddings", True)
  if not config.tie_word_embeddings and LM_HEAD not in state_dict and weights_tied:
    state_dict[LM_HEAD] = state_dict.get(SHARED)
    notes.append(f"{LM_HEAD} absent and config.json ties the weights: logits_dense = {SHARED}.T")
    if state_dict[LM_HEAD] is None:
      del state_dict[LM_HEAD]
  params, report = t5_params_from_hf(state_dict, config, strict=strict, return_report=True,
                                     source=path_or_dir)
  report.notes.extend(notes)
  return (params, config, report) if return_report else (params, config)


def read_hf_config(directory: str) -> dict:
  path = common.require_path(os.path.join(directory, "config.json"), "the T5 checkpoint's")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise common.SourceError(f"{path}: not a readable config.json ({e})") from e


# ---- T5X ------------------------------------------------------------------------------------


def _is_ts_spec(node: Any) -> bool:
  return isinstance(node, Mapping) and "driver" in node and ("kvstore" in node or "path" in node)


def _flatten_tree(node: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(node, Mapping) and not _is_ts_spec(node):
    out = {}
    for key, value in node.items():
      out.update(_flatten_tree(value, f"{prefix}/{key}" if prefix else str(key)))
    return out
  return {prefix: node}


def _local_spec(spec: Mapping[str, Any], ckpt_dir: str) -> dict[str, Any]:
  """A t5x TensorStore spec (relative path, any kvstore driver) opened from `ckpt_dir`."""
  spec = json.loads(json.dumps(spec))  # deep copy of plain JSON
  kvstore = spec.get("kvstore", {})
  relative = kvstore.get("path") if isinstance(kvstore, Mapping) else None
  relative = relative or spec.pop("path", None)
  spec.pop("path", None)
  if not relative:
    raise ValueError(f"TensorStore spec without a path: {spec}")
  if kvstore.get("driver", "file") not in ("file", "gfile", "gcs"):
    raise ValueError(f"unsupported TensorStore kvstore driver in {spec}")
  spec["kvstore"] = {"driver": "file", "path": os.path.join(ckpt_dir, relative)}
  metadata = dict(spec.get("metadata", {}))
  for key in ("chunks", "compressor"):  # as t5x: open whatever chunking the writer chose
    metadata.pop(key, None)
  spec["metadata"] = metadata
  return spec


class _T5XTarget(Mapping):
  """Lazy {'/'-joined path: array} view of a t5x checkpoint's target (reads on access)."""

  def __init__(self, leaves: Mapping[str, Any], ckpt_dir: str):
    self._leaves, self._dir = dict(leaves), ckpt_dir

  def __getitem__(self, key: str) -> np.ndarray:
    leaf = self._leaves[key]
    if not _is_ts_spec(leaf):
      return np.asarray(leaf)
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    store = ts.open(_local_spec(leaf, self._dir), open=True, read=True).result()
    return store.read().result()

  def __iter__(self):
    return iter(self._leaves)

  def __len__(self) -> int:
    return len(self._leaves)


def read_t5x_target(path: str) -> tuple[Mapping[str, np.ndarray], int]:
  """(lazy flat 'target', format version) of a classic t5x checkpoint dir or `checkpoint` file."""
  from flax import serialization  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  ckpt_file = os.path.join(path, "checkpoint") if os.path.isdir(path) else path
  if not os.path.isfile(ckpt_file):
    raise FileNotFoundError(f"{path}: no t5x `checkpoint` msgpack file (only the classic "
                            "TensorStore layout is supported, not Orbax/OCDBT)")
  with open(ckpt_file, "rb") as f:
    raw = f.read()
  if raw.startswith(b"model_checkpoint_path"):
    raise ValueError(f"{ckpt_file} is a TensorFlow checkpoint index, not a t5x checkpoint")
  contents = serialization.msgpack_restore(raw)
  version = int(contents.get("version", 0))
  if version and version < 2:
    raise ValueError(f"{ckpt_file}: t5x checkpoint version {version} (< 2) is not supported")
  state = contents["optimizer"] if version else contents
  if "target" not in state:
    raise ValueError(f"{ckpt_file}: no 'target' in the checkpoint (keys: {sorted(state)})")
  return _T5XTarget(_flatten_tree(state["target"]), os.path.dirname(ckpt_file)), version


def load_t5x_checkpoint(path: str, config: T5Config, *, strict: bool = True,
                        return_report: bool = False):
  """Base `T5(config)` params from a local classic T5X checkpoint (see the module docstring).

  `path`: the `checkpoint_<step>` directory or its `checkpoint` file. Returns float32 numpy
  params (or `(params, report)`); raises `ConversionError` listing missing, mismatched and (if
  `strict`) unused target parameters.
  """
  target, version = read_t5x_target(path)
  report = ConversionReport(source=f"t5x checkpoint {os.fspath(path)}")
  report.notes.append(f"format version {version}; optimizer state skipped")
  reader = common.Reader(target, report)
  expected = t5_expected_shapes(config)
  flat = common.take_all(reader, [(p, p, None) for p in expected])
  report.finish(flat, expected, strict=strict)
  params = common.unflatten_params(flat)
  return (params, report) if return_report else params
