"""SAM's two-way transformer: tokens and image positions attend to each other.

Used by the prompt feature extractor (learned queries + prompt tokens reading
the fused image map) and reusable by a SAM mask decoder. Architecture as in
Segment Anything (Kirillov et al. 2023, `modeling/transformer.py`):

- Each block: token self-attention -> LN -> token->image cross-attention -> LN
  -> MLP (ReLU) -> LN -> image->token cross-attention -> LN (post-LN, residual
  around each step). Positional encodings are added to queries and keys (not
  values) before every attention: `query_pe` to tokens, `key_pe` to image
  positions.
- The first block skips the PE in self-attention and has *no residual* around
  it (SAM's `skip_first_layer_pe`: the raw prompt embeddings are replaced by
  their self-attention output).
- After the blocks: a final token->image attention with residual and LN.
- Cross-attention runs at `embedding_dim // attention_downsample_rate` internal
  width; self-attention at full width. q/k/v/out projections all have biases.
- LayerNorm eps is a field: original SAM uses torch's default 1e-5, Hugging
  Face's `SamTwoWayTransformer` uses 1e-6.
- An optional key mask (not in SAM, whose image positions are all real) keeps
  tokens from reading padded "image" positions: the mask adapter
  (models/heads/mask.py) runs this transformer over text hidden states, whose
  padding would otherwise change its output. Only token->image attention is
  masked; padded positions still update as queries (image->token) but nothing
  reads them.

Parameter names follow the original SAM checkpoint (`layers_{i}.self_attn.q_proj`,
`norm1`..`norm4`, `mlp.lin1/lin2`, `final_attn_token_to_image`,
`norm_final_attn`), so a converter maps them one to one (Hugging Face renames
`norm{i}` -> `layer_norm{i}` and `norm_final_attn` -> `layer_norm_final_attn`).
Torch Linear weights are [out, in]; flax kernels here are [in, out].
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelllm_jax import layers

Array = jax.Array
Dtype = Any


class Attention(nn.Module):
  """SAM attention: project q/k/v to `internal_dim`, split heads, attend, project out.

  `internal_dim = embedding_dim // downsample_rate`, split into `num_heads`
  heads of `internal_dim // num_heads`. Scores are scaled by 1/sqrt(head_dim).
  """

  embedding_dim: int
  num_heads: int
  downsample_rate: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_BxTxC: Array, k_BxSxC: Array, v_BxSxC: Array,
               key_mask_BxS: Array | None = None) -> Array:
    """q: [B, T, C], k and v: [B, S, C] (key_mask bool[B, S], True = attend) -> [B, T, C]."""
    internal_dim = self.embedding_dim // self.downsample_rate
    if internal_dim % self.num_heads:
      raise ValueError(f"internal dim {internal_dim} not divisible by {self.num_heads} heads")
    head_dim = internal_dim // self.num_heads

    def project(x: Array, name: str) -> Array:
      y = layers.dense(internal_dim, ("embed", "joined_kv"), dtype=self.dtype, name=name)(x)
      return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

    q_BTHD = project(q_BxTxC, "q_proj")
    k_BSHD = project(k_BxSxC, "k_proj")
    v_BSHD = project(v_BxSxC, "v_proj")
    mask = None if key_mask_BxS is None else key_mask_BxS[:, None, None, :]
    out_BTHD = layers.attend(q_BTHD, k_BSHD, v_BSHD, mask_BHTS=mask)
    out_BxTxI = out_BTHD.reshape(*out_BTHD.shape[:-2], internal_dim)
    return layers.dense(
        self.embedding_dim, ("joined_kv", "embed"), dtype=self.dtype, name="out_proj"
    )(out_BxTxI)


class MLPBlock(nn.Module):
  """lin1 -> ReLU -> lin2 (SAM's `MLPBlock` with its default activation)."""

  embedding_dim: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = layers.dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="lin1")(x)
    h = nn.relu(h)
    return layers.dense(self.embedding_dim, ("mlp", "embed"), dtype=self.dtype, name="lin2")(h)


class TwoWayAttentionBlock(nn.Module):
  """One SAM two-way block; returns updated (queries [B, T, C], keys [B, S, C])."""

  embedding_dim: int
  num_heads: int
  mlp_dim: int
  attention_downsample_rate: int = 2
  skip_first_layer_pe: bool = False
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, queries: Array, keys: Array, query_pe: Array, key_pe: Array,
      key_mask: Array | None = None,
  ) -> tuple[Array, Array]:
    def attention(rate: int, name: str) -> Attention:
      return Attention(self.embedding_dim, self.num_heads, rate, dtype=self.dtype, name=name)

    def norm(name: str) -> nn.LayerNorm:
      return layers.layer_norm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)

    self_attn = attention(1, "self_attn")
    if self.skip_first_layer_pe:
      queries = self_attn(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + self_attn(q, q, queries)
    queries = norm("norm1")(queries)

    q = queries + query_pe
    k = keys + key_pe
    queries = queries + attention(self.attention_downsample_rate, "cross_attn_token_to_image")(
        q, k, keys, key_mask)
    queries = norm("norm2")(queries)

    mlp = MLPBlock(self.embedding_dim, self.mlp_dim, dtype=self.dtype, name="mlp")
    queries = norm("norm3")(queries + mlp(queries))

    q = queries + query_pe
    k = keys + key_pe
    keys = keys + attention(self.attention_downsample_rate, "cross_attn_image_to_token")(
        k, q, queries)
    keys = norm("norm4")(keys)
    return queries, keys


class TwoWayTransformer(nn.Module):
  """SAM's TwoWayTransformer over flattened image positions.

  Attributes:
    depth: number of two-way blocks.
    embedding_dim: token and image width C.
    num_heads: attention heads (self- and cross-attention).
    mlp_dim: hidden width of the token MLP.
    attention_downsample_rate: cross-attention runs at C // rate.
    layer_norm_eps: 1e-5 as original SAM (Hugging Face: 1e-6).
    dtype: activation dtype; parameters stay float32.
  """

  depth: int
  embedding_dim: int
  num_heads: int
  mlp_dim: int
  attention_downsample_rate: int = 2
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, image_embedding_BxSxC: Array, image_pe_BxSxC: Array, point_embedding_BxTxC: Array,
      key_mask_BxS: Array | None = None,
  ) -> tuple[Array, Array]:
    """Runs the blocks; returns (queries float[B, T, C], keys float[B, S, C]).

    `key_mask_BxS` (bool, True = a real position; None: all real) hides padded
    positions from the token->image attentions (module docstring).

    `point_embedding` is both the initial token state and the token PE added
    before every attention (as SAM does). Callers flatten an image map
    [B, h, w, C] to [B, h*w, C]; the order of positions does not matter
    beyond matching `image_pe`.
    """
    query_pe = point_embedding_BxTxC.astype(self.dtype)
    key_pe = image_pe_BxSxC.astype(self.dtype)
    queries = query_pe
    keys = image_embedding_BxSxC.astype(self.dtype)
    for i in range(self.depth):
      queries, keys = TwoWayAttentionBlock(
          self.embedding_dim,
          self.num_heads,
          self.mlp_dim,
          self.attention_downsample_rate,
          skip_first_layer_pe=(i == 0),
          layer_norm_eps=self.layer_norm_eps,
          dtype=self.dtype,
          name=f"layers_{i}",
      )(queries, keys, query_pe, key_pe, key_mask_BxS)

    final_attn = Attention(
        self.embedding_dim, self.num_heads, self.attention_downsample_rate, dtype=self.dtype,
        name="final_attn_token_to_image")
    queries = queries + final_attn(queries + query_pe, keys + key_pe, keys, key_mask_BxS)
    queries = layers.layer_norm(
        epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm_final_attn")(queries)
    return queries, keys
