"""T5 importers: parity with transformers' T5 (HF dirs, sharded, .bin), T5X layout, key accounting.

References are small random `T5ForConditionalGeneration`s built offline, float32 on CPU; every
comparison uses one fixed tolerance (max abs diff <= 1e-5).
"""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torchvision_shim  # noqa: F401  (transformers imports torchvision)
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import serialization  # noqa: E402

from pixelllm_jax import scan_layout  # noqa: E402
from pixelllm_jax.convert import common  # noqa: E402
from pixelllm_jax.convert import t5 as convert_t5  # noqa: E402
from pixelllm_jax.lora import LoraConfig  # noqa: E402
from pixelllm_jax.models.t5 import T5  # noqa: E402

TOL = 1e-5
VOCAB, D_MODEL, D_FF = 100, 32, 40
B, S, T = 2, 12, 10
ENC_LENGTHS = (12, 7)  # the second encoder row is padded after 7 tokens


def _hf_model(layout: str, num_buckets: int, max_distance: int, seed: int = 0):
  """A random HF T5 in one of three layouts (T5-style ids, no dropout).

  'v1.1': gated-gelu, untied lm_head, no logit scaling (T5 v1.1 / Flan-T5).
  'v1.0': relu, lm_head tied to the embedding, logits scaled by d_model**-0.5 (original T5).
  'tied-unscaled': what transformers 5.x builds from `tie_word_embeddings=False` alone: no
    scaling, but lm_head still tied to `shared`.
  """
  torch.manual_seed(seed)
  heads, d_kv = (4, 16) if layout != "v1.0" else (3, 8)  # heads * d_kv != d_model
  cfg = transformers.T5Config(
      vocab_size=VOCAB, d_model=D_MODEL, d_kv=d_kv, num_heads=heads, d_ff=D_FF, num_layers=2,
      num_decoder_layers=2, relative_attention_num_buckets=num_buckets,
      relative_attention_max_distance=max_distance, dropout_rate=0.0,
      feed_forward_proj="relu" if layout == "v1.0" else "gated-gelu",
      tie_word_embeddings=layout == "v1.0")
  if layout == "v1.1":
    cfg.tie_word_embeddings = False  # transformers 5.x ties lm_head unless untied explicitly
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  tied = model.lm_head.weight is model.shared.weight
  assert tied == (layout != "v1.1")
  assert cfg.scale_decoder_outputs == (layout == "v1.0")
  with torch.no_grad():
    for name, p in model.named_parameters():  # HF initializes norms to 1: make them matter
      if "layer_norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
    # Without the d_model**-0.5 output scaling, HF's std-1 lm_head (or shared table) gives logits
    # up to ~22 at this width, where float32 rounding alone moves them by ~1e-5 (HF float32 vs
    # HF float64: 9e-6). Std d_model**-0.5 keeps them at the scaled model's size (|logit| < ~5),
    # so the fixed 1e-5 tolerance measures the conversion, not float32 arithmetic.
    if not cfg.scale_decoder_outputs:
      model.lm_head.weight.normal_(0.0, D_MODEL**-0.5)  # is `shared` when tied
    # Untied 5.x stacks get their own random embed_tokens; real checkpoints share one table.
    for stack in (model.encoder, model.decoder):
      if stack.embed_tokens.weight is not model.shared.weight:
        stack.embed_tokens.weight.copy_(model.shared.weight)
  return model


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(2, VOCAB, (B, S))
  mask = np.arange(S)[None, :] < np.array(ENC_LENGTHS)[:, None]
  input_ids = np.where(mask, input_ids, 0)
  labels = rng.integers(2, VOCAB, (B, T))
  decoder_input = np.concatenate([np.zeros((B, 1), np.int64), labels[:, :-1]], 1)  # shift right
  return input_ids, mask, decoder_input


def _max_diffs(model, params, config):
  """(encoder max abs diff over valid positions, logits max abs diff) ours vs HF."""
  input_ids, mask, decoder_input = _inputs()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(input_ids),
                attention_mask=torch.tensor(mask.astype(np.int64)),
                decoder_input_ids=torch.tensor(decoder_input))
  ours, variables = T5(config), {"params": params}
  embeds = ours.apply(variables, jnp.asarray(input_ids), method=T5.embed)
  encoded = ours.apply(variables, embeds, jnp.asarray(mask), method=T5.encode)
  logits, _ = ours.apply(variables, encoded, jnp.asarray(mask), jnp.asarray(decoder_input),
                         method=T5.decode)
  enc_diff = np.abs(np.asarray(encoded) - out.encoder_last_hidden_state.numpy())[mask].max()
  logit_diff = np.abs(np.asarray(logits) - out.logits.numpy()).max()
  return float(enc_diff), float(logit_diff)


def _check_parity(model, params, config, label):
  enc_diff, logit_diff = _max_diffs(model, params, config)
  print(f"\n[{label}] encoder max|diff| {enc_diff:.2e}, logits max|diff| {logit_diff:.2e}")
  assert enc_diff <= TOL and logit_diff <= TOL, (label, enc_diff, logit_diff)


def _assert_same_params(a, b):
  flat_a, flat_b = common.flatten_params(a), common.flatten_params(b)
  assert flat_a.keys() == flat_b.keys()
  assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


CASES = [("v1.1", 32, 128), ("v1.1", 8, 20), ("v1.0", 32, 128), ("v1.0", 8, 20),
         ("tied-unscaled", 16, 32)]


@pytest.mark.parametrize("layout,num_buckets,max_distance", CASES)
def test_parity_from_save_pretrained(tmp_path, layout, num_buckets, max_distance):
  model = _hf_model(layout, num_buckets, max_distance)
  model.save_pretrained(tmp_path)
  params, config, report = convert_t5.load_hf_t5(str(tmp_path), return_report=True)
  assert config.feed_forward == ("relu" if layout == "v1.0" else "gated-gelu")
  assert config.tie_word_embeddings == (layout == "v1.0")
  assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (
      num_buckets, max_distance)
  assert (config.num_heads * config.d_kv) != config.d_model
  assert not report.unused and not report.missing and not report.mismatched
  if layout == "tied-unscaled":  # saved without lm_head: logits_dense comes from shared
    assert any("lm_head.weight absent" in n for n in report.notes)
  _check_parity(model, params, config,
                f"{layout} buckets={num_buckets} max_distance={max_distance}")


def test_parity_from_torch_bin_and_sharded_safetensors(tmp_path):
  model = _hf_model("v1.1", 32, 128, seed=1)
  # pytorch_model.bin from torch.save: keeps the embed_tokens copies and lm_head.
  bin_dir = tmp_path / "bin"
  model.save_pretrained(bin_dir)
  os.remove(bin_dir / "model.safetensors")
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  params, config, report = convert_t5.load_hf_t5(str(bin_dir), return_report=True)
  assert set(report.ignored) == {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
  _check_parity(model, params, config, "v1.1 pytorch_model.bin")
  # A single weight file given directly (config.json beside it) gives the same params.
  params_file, _ = convert_t5.load_hf_t5(str(bin_dir / "pytorch_model.bin"))
  _assert_same_params(params, params_file)
  # Sharded safetensors (model.safetensors.index.json).
  shard_dir = tmp_path / "sharded"
  model.save_pretrained(shard_dir, max_shard_size="20KB")
  assert (shard_dir / "model.safetensors.index.json").exists()
  assert len(list(shard_dir.glob("model-*.safetensors"))) > 1
  params_sharded, _ = convert_t5.load_hf_t5(str(shard_dir))
  _assert_same_params(params, params_sharded)


def test_parity_after_conversion_to_the_scanned_layout(tmp_path):
  """Imported weights (per layer) converted to the scanned layout still match transformers."""
  model = _hf_model("v1.1", 32, 128, seed=2)
  model.save_pretrained(tmp_path)
  params, config = convert_t5.load_hf_t5(str(tmp_path))
  scanned_config = dataclasses.replace(config, scan=True)
  input_ids, mask, decoder_input = _inputs()
  like = nn.meta.unbox(jax.eval_shape(
      T5(scanned_config).init, jax.random.key(0), jnp.zeros((B, S, config.d_model)),
      jnp.asarray(mask), jnp.asarray(decoder_input)))["params"]
  scanned = scan_layout.convert(params, like)
  assert "layers_0" not in scanned["decoder"] and "layers" in scanned["decoder"]
  _check_parity(model, scanned, scanned_config, "v1.1 scanned layout")


# ---- T5X layout ------------------------------------------------------------------------------


def _write_t5x_checkpoint(ckpt_dir, params, *, raw=(), legacy=()):
  """Writes `params` in t5x's classic layout (checkpoints.Checkpointer, format version 3).

  `checkpoint`: flax msgpack of {'version': 3, 'optimizer': {'target': ..., 'state': ...}}; each
  target leaf is a TensorStore zarr spec with a path relative to the checkpoint dir, pointing to
  a gzip-compressed zarr array in `target.<path with dots>/`. Paths in `raw` are stored as arrays
  inside the msgpack (t5x does this for unpartitioned leaves); paths in `legacy` get the gcs-driver
  spec with the path beside 'kvstore' (what t5x wrote to gs:// with older tensorstore).
  """
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  os.makedirs(ckpt_dir)
  leaves = {}
  for path, value in common.flatten_params(params).items():
    value = np.asarray(value, np.float32)
    if path in raw:
      leaves[path] = value
      continue
    relative = ("target/" + path).replace("/", ".")
    metadata = {"compressor": {"id": "gzip"}, "shape": list(value.shape),
                "chunks": [max(1, n // 2) for n in value.shape]}  # several chunks per array
    spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path": relative},
            "metadata": metadata}
    absolute = {**spec, "kvstore": {"driver": "file", "path": os.path.join(ckpt_dir, relative)}}
    store = ts.open(absolute, create=True, open=True).result()
    store.write(value).result()
    if path in legacy:
      leaves[path] = {"driver": "zarr", "dtype": "float32", "path": relative,
                      "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket"},
                      "metadata": metadata}
    else:
      leaves[path] = ts.Spec(spec).to_json()  # what t5x's msgpack holds for the leaf
  target = common.unflatten_params(leaves)
  state = {"step": np.int32(1000),
           "param_states": {"token_embedder": {"embedding": {"v_row": np.zeros(3, np.float32)}}}}
  with open(os.path.join(ckpt_dir, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(
        {"version": 3, "optimizer": {"target": target, "state": state}}))


def test_t5x_checkpoint_round_trip(tmp_path):
  model = _hf_model("v1.1", 8, 20, seed=2)
  model.save_pretrained(tmp_path / "hf")
  params, config = convert_t5.load_hf_t5(str(tmp_path / "hf"))
  ckpt = tmp_path / "t5x" / "checkpoint_1000"
  _write_t5x_checkpoint(str(ckpt), params, raw=("decoder/decoder_norm/scale",),
                        legacy=("encoder/layers_1/mlp/wo/kernel",))
  assert (ckpt / "target.encoder.layers_0.attention.query.kernel" / ".zarray").exists()
  loaded, report = convert_t5.load_t5x_checkpoint(str(ckpt), config, return_report=True)
  _assert_same_params(params, loaded)
  assert len(report.used) == len(common.flatten_params(params)) and not report.unused
  _check_parity(model, loaded, config, "v1.1 via t5x layout")
  # The `checkpoint` file path works too; a tied config against an untied checkpoint does not.
  convert_t5.load_t5x_checkpoint(str(ckpt / "checkpoint"), config)
  with pytest.raises(common.ConversionError, match="decoder/logits_dense/kernel"):
    convert_t5.load_t5x_checkpoint(str(ckpt), dataclasses.replace(config, tie_word_embeddings=True))


# ---- errors, LoRA ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v10_model_and_config():
  model = _hf_model("v1.0", 8, 20, seed=3)
  config = convert_t5.hf_config_to_t5(model.config.to_dict())
  return model, config


def test_errors_list_every_offending_key(v10_model_and_config):
  model, config = v10_model_and_config
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  wrong = "encoder.block.1.layer.0.SelfAttention.q.weight"
  sd[wrong] = sd[wrong][:-1]                                             # wrong shape
  extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
  sd[extra] = torch.zeros(8, 3)                                          # extra key
  missing = "decoder.final_layer_norm.weight"
  del sd[missing]                                                        # missing key
  sd["encoder.embed_tokens.weight"] = sd["encoder.embed_tokens.weight"] + 1  # a differing alias
  with pytest.raises(common.ConversionError) as err:
    convert_t5.t5_params_from_hf(sd, config)
  message = str(err.value)
  for key in (wrong, extra, missing, "encoder/layers_1/attention/query/kernel",
              "encoder.embed_tokens.weight"):
    assert key in message, (key, message)
  report = err.value.report
  assert report.unused == [extra] and any(missing in m for m in report.missing)


def test_unused_keys_are_reported_when_not_strict(v10_model_and_config):
  model, config = v10_model_and_config
  sd = dict(model.state_dict())
  sd["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(8, 3)
  sd["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 3)
  params, report = convert_t5.t5_params_from_hf(sd, config, strict=False, return_report=True)
  assert report.unused == ["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]
  assert "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight" in report.ignored
  assert "lm_head.weight" in report.ignored  # tied: equals shared.weight
  _check_parity(model, params, config, "v1.0 from state_dict(), strict=False")
  with pytest.raises(common.ConversionError, match="unused source keys"):
    convert_t5.t5_params_from_hf(sd, config)


def test_hf_config_mapping():
  base = dict(vocab_size=32128, d_model=64, d_kv=8, num_heads=4, d_ff=96, num_layers=3)
  flan = convert_t5.hf_config_to_t5({**base, "feed_forward_proj": "gated-gelu",
                                     "tie_word_embeddings": False, "num_decoder_layers": 2})
  assert (flan.tie_word_embeddings, flan.feed_forward, flan.num_encoder_layers,
          flan.num_decoder_layers) == (False, "gated-gelu", 3, 2)
  original = convert_t5.hf_config_to_t5(base)  # HF defaults: relu, tied, 32 buckets, 128
  assert (original.tie_word_embeddings, original.feed_forward,
          original.relative_attention_num_buckets, original.relative_attention_max_distance,
          original.num_decoder_layers) == (True, "relu", 32, 128, 3)
  assert not convert_t5.hf_config_to_t5(
      {**base, "tie_word_embeddings": True, "scale_decoder_outputs": False}).tie_word_embeddings
  assert convert_t5.hf_config_to_t5(base, dropout_rate=0.1).dropout_rate == 0.1
  with pytest.raises(ValueError, match="gated-silu"):
    convert_t5.hf_config_to_t5({**base, "feed_forward_proj": "gated-silu"})
  with pytest.raises(ValueError, match="umt5"):
    convert_t5.hf_config_to_t5({**base, "model_type": "umt5"})


def test_with_fresh_lora_keeps_outputs(v10_model_and_config):
  model, config = v10_model_and_config
  base = convert_t5.t5_params_from_hf(model.state_dict(), config)
  lora_config = dataclasses.replace(config, lora=LoraConfig(rank=2))
  input_ids, mask, decoder_input = _inputs()
  embeds = T5(config).apply({"params": base}, jnp.asarray(input_ids), method=T5.embed)
  init = T5(lora_config).init(jax.random.key(1), embeds, jnp.asarray(mask),
                              jnp.asarray(decoder_input))["params"]
  combined = convert_t5.with_fresh_lora(base, init)  # boxed init: boxes are kept
  assert isinstance(combined["encoder"]["layers_0"]["attention"]["query"]["kernel"],
                    nn.LogicallyPartitioned)
  combined = nn.meta.unbox(combined)
  flat = common.flatten_params(combined)
  assert any(p.endswith("lora_a") for p in flat)
  assert all(not np.any(v) for p, v in flat.items() if p.endswith("lora_b"))
  args = (embeds, jnp.asarray(mask), jnp.asarray(decoder_input))
  want, _ = T5(config).apply({"params": base}, *args)
  got, _ = T5(lora_config).apply({"params": combined}, *args)
  assert float(jnp.abs(want - got).max()) <= TOL
  bad = dict(base, token_embedder={"embedding": np.zeros((VOCAB + 1, D_MODEL), np.float32)})
  with pytest.raises(ValueError, match="token_embedder/embedding"):
    convert_t5.with_fresh_lora(bad, init)


def test_load_state_dict_rejects_unknown_files(tmp_path):
  (tmp_path / "weights.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown weight file type"):
    common.load_state_dict(str(tmp_path / "weights.npz"))
  with pytest.raises(common.SourceError, match="model.safetensors"):
    common.load_state_dict(str(tmp_path))
  # A corrupt file is named, with what went wrong.
  (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
  with pytest.raises(common.SourceError, match=r"broken.safetensors: cannot read the weights"):
    common.load_state_dict(str(tmp_path / "broken.safetensors"))
  with pytest.raises(common.SourceError, match=r"weights .*/nowhere: no such file"):
    common.load_state_dict(str(tmp_path / "nowhere"))
  wrapped = tmp_path / "wrapped.pth"
  torch.save({"model": {"w": torch.ones(2, dtype=torch.bfloat16)}, "epoch": 3}, wrapped)
  sd = common.load_state_dict(str(wrapped))
  assert list(sd) == ["w"] and sd["w"].dtype.name == "bfloat16"
