"""T5 encoder-decoder in the t5x conventions, taking embeddings on the encoder side.

PixelLLM feeds the T5 encoder its visual tokens followed by the embedded text
prompt, so `encode` takes embeddings plus a boolean mask; the decoder reads
tokens, and also returns the final-norm hidden states its localization head uses.

Architectural choices (sources: Raffel et al. 2020; t5x `examples/t5/network.py`):
- Pre-norm residual blocks with RMSNorm (scale only); final norm on each stack.
- No attention score scaling (t5x folds 1/sqrt(d_kv) into the query init instead).
- Relative position bias: one table per stack shared by its layers (bidirectional
  buckets in the encoder, causal ones in the decoder; cross-attention has none).
  Each self-attention looks its bias up from the shared table for its own query
  positions; that keeps one code path for training, the cache-filling call and
  single-token cached steps (a [H, T, S] gather per layer, negligible next to
  the attention itself).
- MLP: 'gated-gelu' (T5 v1.1 / Flan: gelu_tanh(x W0) * (x W1), HF 'gelu_new') or
  'relu' (original T5). No biases anywhere.
- Logits: untied `logits_dense` (v1.1 / Flan) or tied to the token embedding
  with the hidden scaled by d_model**-0.5 (original T5).
- Dropout as t5x: on embeddings, after each sublayer, inside the MLP and after
  the final norm, with the mask shared across the sequence (broadcast_dims=(-2,)).
  Unlike t5x there is no dropout on attention weights (layers.attend has none).
- LoRA (official PixelLLM): `LoraConfig` picks which of q/k/v/o in encoder
  self-, decoder self- and decoder cross-attention get adapters.
- KV cache (flax wmt / t5x idiom) on decoder self-attention; the cross-attention
  keys/values of the encoder output are projected once per sequence, when the
  cache is created, and kept in the cache.
- `scan`: each stack's layers run as one `nn.scan` (layers.block_stack); the
  parameters then sit under `encoder/layers` and `decoder/layers` with a leading
  layer axis (t5x's scanned layout), and scan_layout.py converts either way.

Parameter names are t5x's, with t5x's shapes: kernels [in, out] (attention
[D, H*d_kv] / [H*d_kv, D]), rel_embedding [H, buckets]; a t5x checkpoint maps
one to one. Hugging Face T5 (torch Linear weights are [out, in], so every
kernel and rel_embedding is transposed; `i` is the layer index):

  token_embedder/embedding [V, D]                -> shared.weight
  encoder/relpos_bias/rel_embedding              -> encoder.block.0.layer.0.SelfAttention
                                                    .relative_attention_bias.weight.T
  encoder/layers_i/pre_attention_layer_norm      -> encoder.block.i.layer.0.layer_norm
  encoder/layers_i/attention/{query,key,value,out}
                                                 -> encoder.block.i.layer.0.SelfAttention.{q,k,v,o}
  encoder/layers_i/pre_mlp_layer_norm            -> encoder.block.i.layer.1.layer_norm
  encoder/layers_i/mlp/{wi_0,wi_1 | wi, wo}      -> encoder.block.i.layer.1.DenseReluDense.<same>
  encoder/encoder_norm                           -> encoder.final_layer_norm
  decoder/relpos_bias/rel_embedding              -> decoder.block.0.layer.0.SelfAttention
                                                    .relative_attention_bias.weight.T
  decoder/layers_i/pre_self_attention_layer_norm -> decoder.block.i.layer.0.layer_norm
  decoder/layers_i/self_attention/*              -> decoder.block.i.layer.0.SelfAttention.*
  decoder/layers_i/pre_cross_attention_layer_norm -> decoder.block.i.layer.1.layer_norm
  decoder/layers_i/encoder_decoder_attention/*   -> decoder.block.i.layer.1.EncDecAttention.*
  decoder/layers_i/pre_mlp_layer_norm            -> decoder.block.i.layer.2.layer_norm
  decoder/layers_i/mlp/*                         -> decoder.block.i.layer.2.DenseReluDense.*
  decoder/decoder_norm                           -> decoder.final_layer_norm
  decoder/logits_dense [D, V] (untied only)      -> lm_head.weight.T

(`.../scale` <-> `.weight`, `.../kernel` <-> `.weight.T`.)

Adapters add `lora_a` [in, rank] and `lora_b` [rank, out] beside a kernel.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixelllm_jax import layers, partitioning
from pixelllm_jax.lora import LoraConfig, LoraDense

Array = jax.Array
Dtype = Any

FEED_FORWARDS = ("gated-gelu", "relu")

# t5x initializers. The query's is additionally scaled by d_kv**-0.5.
_ATTENTION_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
_MLP_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_RELPOS_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_EMBED_INIT = nn.initializers.normal(stddev=1.0)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes and layout of a T5 (defaults to nothing: give every size).

  feed_forward: 'gated-gelu' (v1.1 / Flan) or 'relu' (original T5).
  tie_word_embeddings: logits from the token embedding (original T5) instead of
    a separate `logits_dense` (v1.1 / Flan).
  dtype: activation dtype; parameters stay float32.
  remat: how each layer is rematerialized in the backward pass
    (`partitioning.RematPolicy` modes; not while decoding with the cache).
  scan: run each stack's layers as one `nn.scan` (scanned parameter layout).
  """

  vocab_size: int
  d_model: int
  num_heads: int
  d_kv: int
  d_ff: int
  num_encoder_layers: int
  num_decoder_layers: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  feed_forward: str = "gated-gelu"
  tie_word_embeddings: bool = False
  lora: LoraConfig = LoraConfig()
  dtype: Dtype = jnp.float32
  remat: str = "none"               # partitioning.RematPolicy modes: 'none', 'block', ...
  scan: bool = False                # each stack as one nn.scan (layers.block_stack layout)

  def __post_init__(self):
    partitioning.check_remat(self.remat)
    if self.feed_forward not in FEED_FORWARDS:
      raise ValueError(
          f"T5Config.feed_forward must be one of {FEED_FORWARDS}, got {self.feed_forward!r}")
    sizes = ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "relative_attention_num_buckets",
             "relative_attention_max_distance")
    for name in sizes:
      if getattr(self, name) <= 0:
        raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
    if not isinstance(self.lora, LoraConfig):
      raise TypeError(f"T5Config.lora must be a LoraConfig, got {type(self.lora).__name__}")


# T5 v1.1 / Flan-T5 sizes: (d_model, num_heads, d_kv, d_ff, layers per stack); vocab 32128.
T5_1_1_SIZES = {
    "small": (512, 6, 64, 1024, 8),
    "base": (768, 12, 64, 2048, 12),
    "large": (1024, 16, 64, 2816, 24),
    "xl": (2048, 32, 64, 5120, 24),
    "xxl": (4096, 64, 64, 10240, 24),
}


def t5_1_1_config(size: str = "xl", **overrides: Any) -> T5Config:
  """A T5 v1.1 / Flan-T5 config (gated-GELU, untied logits); PixelLLM uses 'xl'.

  `overrides` replace any field, e.g. `lora=LoraConfig(rank=32)` or `dropout_rate=0.1`.
  """
  if size not in T5_1_1_SIZES:
    raise ValueError(f"unknown T5 v1.1 size {size!r}; choose from {sorted(T5_1_1_SIZES)}")
  d_model, heads, d_kv, d_ff, depth = T5_1_1_SIZES[size]
  fields = dict(vocab_size=32128, d_model=d_model, num_heads=heads, d_kv=d_kv, d_ff=d_ff,
                num_encoder_layers=depth, num_decoder_layers=depth,
                feed_forward="gated-gelu", tie_word_embeddings=False)
  return T5Config(**{**fields, **overrides})


def relative_position_bucket(
    relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
  """T5's bucket of `relative_position = key_position - query_position` (int32, same shape).

  Half the buckets (per direction when bidirectional) hold exact small
  distances, the rest grow logarithmically up to `max_distance`; farther
  distances share the last bucket. Causal buckets map every future key to 0.
  Computed in float32 with t5x's epsilon, which matches Mesh TF / HF buckets.
  """
  n = -jnp.asarray(relative_position, jnp.int32)
  bucket = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  log_ratio = jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
  if_large = max_exact + (
      log_ratio / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  if_large = jnp.minimum(if_large, num_buckets - 1)
  return bucket + jnp.where(n < max_exact, n, if_large)


def relative_position_bias(
    rel_embedding_HxN: Array, q_pos_T: Array, k_pos_S: Array, *, bidirectional: bool,
    max_distance: int,
) -> Array:
  """Bias float32[1, H, T, S] for queries at `q_pos_T` and keys at `k_pos_S` (int positions)."""
  buckets_TxS = relative_position_bucket(
      k_pos_S[None, :] - q_pos_T[:, None], bidirectional=bidirectional,
      num_buckets=rel_embedding_HxN.shape[1], max_distance=max_distance)
  return jnp.take(rel_embedding_HxN, buckets_TxS, axis=1)[None]


class Embed(nn.Module):
  """Token embedding table [V, D] named ('vocab', 'embed'); `attend` gives x @ E^T."""

  vocab_size: int
  features: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", layers.param_init(_EMBED_INIT, ("vocab", "embed")),
        (self.vocab_size, self.features))

  def __call__(self, tokens_BxT: Array) -> Array:
    """int[B, T] -> dtype[B, T, D]."""
    return jnp.take(self.embedding, tokens_BxT, axis=0).astype(self.dtype)

  def attend(self, x_BxTxD: Array) -> Array:
    """[B, T, D] -> [B, T, V] logits against the table."""
    return jnp.einsum("btd,vd->btv", x_BxTxD.astype(self.dtype), self.embedding.astype(self.dtype))


class RelativePositionTable(nn.Module):
  """The per-stack relative position bias table, float32[H, buckets] (t5x layout)."""

  num_heads: int
  num_buckets: int

  @nn.compact
  def __call__(self) -> Array:
    return self.param("rel_embedding", layers.param_init(_RELPOS_INIT, ("heads", "relpos_buckets")),
                      (self.num_heads, self.num_buckets))


class Attention(nn.Module):
  """T5 multi-head attention with optional LoRA, causal masking, relative bias and KV cache.

  Attributes:
    lora_targets: which of ('q','k','v','o') carry adapters of `lora.rank`.
    causal: queries see keys at positions <= their own (decoder self-attention).
    max_distance: relative-position max distance (used when a table is given).
  """

  num_heads: int
  d_kv: int
  lora: LoraConfig
  lora_targets: tuple[str, ...]
  causal: bool = False
  max_distance: int = 128
  dtype: Dtype = jnp.float32

  def _proj(self, features, axes, projection, kernel_init, name):
    return LoraDense(features, axes, rank=self.lora.rank_for(self.lora_targets, projection),
                     scale=self.lora.scale, kernel_init=kernel_init, dtype=self.dtype, name=name)

  @nn.compact
  def __call__(
      self, x_BxTxD: Array, kv_BxSxD: Array, key_mask_BxS: Array | None = None,
      rel_embedding_HxN: Array | None = None, *, deterministic: bool = True, decode: bool = False,
  ) -> Array:
    """Attends queries from `x_BxTxD` to keys/values from `kv_BxSxD`; returns [B, T, D].

    key_mask_BxS: bool, False marks padded keys. rel_embedding_HxN: the shared
    bias table (self-attention only). decode: use the 'cache' collection (see T5.decode).
    """
    del deterministic  # no dropout on attention weights (see module docstring)
    b, t, d_model = x_BxTxD.shape
    joined = self.num_heads * self.d_kv
    query_init = lambda *a: _ATTENTION_INIT(*a) * self.d_kv**-0.5  # noqa: E731
    q = self._proj(joined, ("embed", "joined_kv"), "q", query_init, "query")(x_BxTxD)
    q_BTHK = _heads(q.reshape(b, t, self.num_heads, self.d_kv))

    def project_kv():
      k = self._proj(joined, ("embed", "joined_kv"), "k", _ATTENTION_INIT, "key")(kv_BxSxD)
      v = self._proj(joined, ("embed", "joined_kv"), "v", _ATTENTION_INIT, "value")(kv_BxSxD)
      return (_heads(k.reshape(b, -1, self.num_heads, self.d_kv)),
              _heads(v.reshape(b, -1, self.num_heads, self.d_kv)))

    if decode and not self.causal:
      # Cross-attention while decoding: the encoder side is fixed for the whole sequence,
      # so its keys and values are projected once (the cache-creating call) and read back
      # at every step instead of re-projecting [B, S, D] per token.
      if self.has_variable("cache", "cross_key"):
        k_BSHK = self.get_variable("cache", "cross_key")
        v_BSHK = self.get_variable("cache", "cross_value")
      else:
        k_BSHK, v_BSHK = project_kv()
        self.put_variable("cache", "cross_key", k_BSHK)
        self.put_variable("cache", "cross_value", v_BSHK)
    else:
      k_BSHK, v_BSHK = project_kv()
    q_pos = jnp.arange(t)
    k_pos = jnp.arange(k_BSHK.shape[1])

    if decode and self.causal:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, k_BSHK.shape, k_BSHK.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, v_BSHK.shape, v_BSHK.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if initialized:  # one new token: write it at cache_index, attend over the filled prefix
        if t != 1:
          raise ValueError(f"cached decoding takes one token per call, got {t}")
        cur = cache_index.value
        k_BSHK = jax.lax.dynamic_update_slice(cached_key.value, k_BSHK, (0, cur, 0, 0))
        v_BSHK = jax.lax.dynamic_update_slice(cached_value.value, v_BSHK, (0, cur, 0, 0))
        cached_key.value, cached_value.value = k_BSHK, v_BSHK
        cache_index.value = cur + 1
        q_pos = cur[None]
        k_pos = jnp.arange(k_BSHK.shape[1])

    mask = None
    if self.causal:  # also hides the unfilled cache slots (positions > cur)
      mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if key_mask_BxS is not None:
      key_mask = key_mask_BxS.astype(bool)[:, None, None, :]
      mask = key_mask if mask is None else mask & key_mask
    bias = None
    if rel_embedding_HxN is not None:
      bias = relative_position_bias(rel_embedding_HxN, q_pos, k_pos, bidirectional=not self.causal,
                                    max_distance=self.max_distance)
    out_BTHK = layers.attend(q_BTHK, k_BSHK, v_BSHK, bias_BHTS=bias, mask_BHTS=mask, scale=1.0)
    out = _heads(out_BTHK).reshape(b, t, joined)
    out = self._proj(d_model, ("joined_kv", "embed"), "o", _ATTENTION_INIT, "out")(out)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


def _heads(x_BTHK: Array) -> Array:
  """Per-head activations [B, T, H, K], constrained as t5x does inside attention."""
  return nn.with_logical_constraint(x_BTHK, ("batch", "length", "heads", "kv"))


def _dropout(rate: float) -> nn.Dropout:
  return nn.Dropout(rate=rate, broadcast_dims=(-2,))


class Mlp(nn.Module):
  """T5 feed-forward: gated-GELU (wi_0, wi_1, wo) or ReLU (wi, wo); [B, T, D] -> [B, T, D]."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    dense = lambda f, axes, name: layers.dense(  # noqa: E731
        f, axes, use_bias=False, dtype=cfg.dtype, kernel_init=_MLP_INIT, name=name)
    if cfg.feed_forward == "gated-gelu":
      h = (nn.gelu(dense(cfg.d_ff, ("embed", "mlp"), "wi_0")(x), approximate=True)
           * dense(cfg.d_ff, ("embed", "mlp"), "wi_1")(x))
    else:
      h = nn.relu(dense(cfg.d_ff, ("embed", "mlp"), "wi")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = _dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return dense(x.shape[-1], ("mlp", "embed"), "wo")(h)


def _norm(cfg: T5Config, name: str) -> layers.RMSNorm:
  return layers.RMSNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name=name)


class EncoderLayer(nn.Module):
  """Pre-norm self-attention (bidirectional relative bias) + MLP block."""

  config: T5Config

  @nn.compact
  def __call__(self, x_BxTxD: Array, mask_BxT: Array, rel_embedding_HxN: Array,
               deterministic: bool = True) -> Array:
    cfg = self.config
    h = _norm(cfg, "pre_attention_layer_norm")(x_BxTxD)
    h = Attention(cfg.num_heads, cfg.d_kv, cfg.lora, cfg.lora.encoder_self,
                  max_distance=cfg.relative_attention_max_distance, dtype=cfg.dtype,
                  name="attention")(h, h, mask_BxT, rel_embedding_HxN, deterministic=deterministic)
    x = x_BxTxD + _dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = Mlp(cfg, name="mlp")(_norm(cfg, "pre_mlp_layer_norm")(x), deterministic)
    x = x + _dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention to the encoder, MLP."""

  config: T5Config

  @nn.compact
  def __call__(self, y_BxTxD: Array, encoded_BxSxD: Array, encoder_mask_BxS: Array,
               rel_embedding_HxN: Array, deterministic: bool = True, decode: bool = False) -> Array:
    cfg = self.config
    attention = lambda targets, causal, name: Attention(  # noqa: E731
        cfg.num_heads, cfg.d_kv, cfg.lora, targets, causal=causal,
        max_distance=cfg.relative_attention_max_distance, dtype=cfg.dtype, name=name)
    dropout = _dropout(cfg.dropout_rate)
    h = _norm(cfg, "pre_self_attention_layer_norm")(y_BxTxD)
    h = attention(cfg.lora.decoder_self, True, "self_attention")(
        h, h, None, rel_embedding_HxN, deterministic=deterministic, decode=decode)
    y = y_BxTxD + dropout(h, deterministic=deterministic)
    h = _norm(cfg, "pre_cross_attention_layer_norm")(y)
    h = attention(cfg.lora.decoder_cross, False, "encoder_decoder_attention")(
        h, encoded_BxSxD, encoder_mask_BxS, None, deterministic=deterministic, decode=decode)
    y = y + dropout(h, deterministic=deterministic)
    h = Mlp(cfg, name="mlp")(_norm(cfg, "pre_mlp_layer_norm")(y), deterministic)
    y = y + dropout(h, deterministic=deterministic)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


class Encoder(nn.Module):
  """Embeddings float32[B, T, D] + bool[B, T] mask -> encoder_norm output [B, T, D]."""

  config: T5Config

  @nn.compact
  def __call__(self, embeds_BxTxD: Array, mask_BxT: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    table = RelativePositionTable(cfg.num_heads, cfg.relative_attention_num_buckets,
                                  name="relpos_bias")()
    x = _dropout(cfg.dropout_rate)(embeds_BxTxD.astype(cfg.dtype), deterministic=deterministic)
    x = layers.block_stack(
        EncoderLayer, x, mask_BxT, table, deterministic, depth=cfg.num_encoder_layers,
        name="layers", scan=cfg.scan, block_kwargs=lambda i: dict(config=cfg),
        remat=lambda c: partitioning.remat(c, cfg.remat, static_argnums=(4,)))
    x = _norm(cfg, "encoder_norm")(x)
    return _dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  """Decoder stack; returns (logits [B, T, V], hidden = decoder_norm output [B, T, D])."""

  config: T5Config
  shared_embedding: Embed

  @nn.compact
  def __call__(self, encoded_BxSxD: Array, encoder_mask_BxS: Array, tokens_BxT: Array,
               deterministic: bool = True, decode: bool = False) -> tuple[Array, Array]:
    cfg = self.config
    table = RelativePositionTable(cfg.num_heads, cfg.relative_attention_num_buckets,
                                  name="relpos_bias")()
    dropout = _dropout(cfg.dropout_rate)
    y = dropout(self.shared_embedding(tokens_BxT), deterministic=deterministic)
    # The cache is written inside the layers, so they are never rematerialized while decoding.
    remat_mode = "none" if decode else cfg.remat
    y = layers.block_stack(
        DecoderLayer, y, encoded_BxSxD, encoder_mask_BxS, table, deterministic, decode,
        depth=cfg.num_decoder_layers, name="layers", scan=cfg.scan,
        block_kwargs=lambda i: dict(config=cfg),
        remat=lambda c: partitioning.remat(c, remat_mode, static_argnums=(5, 6)))
    hidden = _norm(cfg, "decoder_norm")(y)
    y = dropout(hidden, deterministic=deterministic)
    if cfg.tie_word_embeddings:
      logits = self.shared_embedding.attend(y * cfg.d_model**-0.5)
    else:
      logits = layers.dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=cfg.dtype,
                            kernel_init=_MLP_INIT, name="logits_dense")(y)
    return logits, hidden


class T5(nn.Module):
  """T5 encoder-decoder whose encoder takes embeddings (PixelLLM: visual tokens + prompt).

  Methods (apply with `method=T5.embed` etc.):
    embed(tokens int[B, T]) -> float32[B, T, D]
    encode(embeds float32[B, T, D], mask bool[B, T]) -> float32[B, T, D]
    decode(encoded [B, S, D], encoder_mask bool[B, S], decoder_input_tokens int[B, T])
      -> (logits float32[B, T, V], hidden float32[B, T, D])
    __call__ = encode then decode.
  """

  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg, shared_embedding=self.token_embedder)

  def embed(self, tokens_BxT: Array) -> Array:
    """The shared token embedding: int[B, T] -> [B, T, D]."""
    return self.token_embedder(tokens_BxT)

  def encode(self, embeds_BxTxD: Array, mask_BxT: Array, *, deterministic: bool = True) -> Array:
    """Bidirectional encoder over embeddings; keys where `mask_BxT` is False are ignored.

    Outputs at padded positions are computed but meaningless.
    """
    x = self.encoder(embeds_BxTxD, mask_BxT, deterministic)
    return nn.with_logical_constraint(x.astype(jnp.float32), ("batch", "length", "embed"))

  def decode(self, encoded_BxSxD: Array, encoder_mask_BxS: Array, decoder_input_tokens_BxT: Array,
             *, deterministic: bool = True, decode: bool = False) -> tuple[Array, Array]:
    """Causal decoder with cross-attention; returns (logits [B, T, V], hidden [B, T, D]).

    `hidden` is the decoder_norm output, before the final dropout and logits.
    decode=True (apply with mutable=['cache']): the first call, while the
    'cache' collection is empty, creates zero caches sized from the full-length
    `decoder_input_tokens_BxT` (its outputs are not meant to be used); every
    later call takes one token [B, 1] at the cache index, writes its keys and
    values there, attends over the filled prefix and advances the index.
    """
    logits, hidden = self.decoder(encoded_BxSxD, encoder_mask_BxS, decoder_input_tokens_BxT,
                                  deterministic, decode)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    hidden = nn.with_logical_constraint(hidden.astype(jnp.float32), ("batch", "length", "embed"))
    return logits, hidden

  def __call__(self, encoder_embeds_BxSxD: Array, encoder_mask_BxS: Array,
               decoder_input_tokens_BxT: Array, *, deterministic: bool = True
               ) -> tuple[Array, Array]:
    """Teacher-forced encode + decode: (logits [B, T, V], hidden [B, T, D])."""
    encoded = self.encode(encoder_embeds_BxSxD, encoder_mask_BxS, deterministic=deterministic)
    return self.decode(encoded, encoder_mask_BxS, decoder_input_tokens_BxT,
                       deterministic=deterministic)
