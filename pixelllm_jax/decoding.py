"""Greedy decoding with a KV cache.

`greedy_decode` is model-agnostic: it drives any `decode_step(tokens, cache) -> (logits, cache)`
inside one `jax.lax.while_loop`, so it traces once, runs under `jax.jit`, and stops as soon as
every row has emitted EOS. `greedy_decode_pixel_llm` adapts the PixelLLM composer's cached
`decode` method (docs/CONVENTIONS.md) to it and reads the per-token points.

Choices and their sources:
- The encoder side is computed once by the caller (`PixelLLM.encode`) and each step runs the
  decoder on one token against the cache (flax wmt idiom). The official code instead re-ran the
  whole model over all positions at every step (docs/DESIGN.md, "Decisions").
- Decoding starts from the T5 decoder start id 0; after a row emits EOS (id 1) the rest of the row
  is pad (0), so outputs match t5x-style targets: words, EOS, zeros.
- Plain argmax. The official greedy decoder also clamps the logit of the previous token (a GRiT
  trick against immediate repetition) and beam search is used by most official configs; neither is
  implemented here.
"""
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pixelllm_jax.batch import DECODER_START_ID, EOS_ID, PAD_ID

Cache = Any
DecodeStep = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]


def greedy_decode(decode_step: DecodeStep, cache: Cache, *, batch_shape: tuple[int, ...],
                  max_len: int, eos_id: int = EOS_ID, start_id: int = DECODER_START_ID
                  ) -> jax.Array:
  """Greedy decoding of up to `max_len` tokens per row.

  Args:
    decode_step: `(tokens int32[*batch_shape, 1], cache) -> (logits float[*batch_shape, V], cache)`;
      reads one token per row and returns the next-token logits. The cache is any pytree whose
      structure, shapes and dtypes stay fixed across steps (a flax 'cache' collection, a counter).
    cache: the initial cache, already sized for `max_len` steps.
    batch_shape: the leading dims of every row, e.g. (B,) or (B, N) for N caption slots per image.
    max_len: the number of tokens generated at most (static).
    eos_id: generation of a row stops after it emits this id.
    start_id: the token fed at the first step.

  Returns:
    int32[*batch_shape, max_len]: the generated tokens. A row that emits EOS within max_len keeps
    the EOS, followed by PAD_ID; a row that never does is cut at max_len without EOS.
  """
  batch_shape = tuple(batch_shape)

  def not_finished(state):
    step, _, done, _, _ = state
    return (step < max_len) & ~jnp.all(done)

  def decode_one(state):
    step, last, done, tokens, cache = state
    logits, cache = decode_step(last[..., None], cache)
    if logits.shape[:-1] != batch_shape:
      raise ValueError(f"decode_step returned logits {logits.shape}, expected "
                       f"{batch_shape} + (vocab,)")
    next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    next_token = jnp.where(done, PAD_ID, next_token)
    tokens = tokens.at[..., step].set(next_token)
    done = done | (next_token == eos_id)
    return step + 1, next_token, done, tokens, cache

  init = (jnp.array(0, jnp.int32),
          jnp.full(batch_shape, start_id, jnp.int32),
          jnp.zeros(batch_shape, bool),
          jnp.full((*batch_shape, max_len), PAD_ID, jnp.int32),
          cache)
  _, _, _, tokens, _ = jax.lax.while_loop(not_finished, decode_one, init)
  return tokens


class Decoded(NamedTuple):
  tokens: jax.Array  # int32[B, N, max_len]: words, EOS, then pad (0)
  points: jax.Array  # float32[B, N, max_len, P, 2]: points[..., t, :, :] localizes tokens[..., t]


def greedy_decode_pixel_llm(model, variables, encoded, max_len: int, *,
                            eos_id: int = EOS_ID) -> Decoded:
  """Greedy captions and per-token points from the PixelLLM composer.

  Args:
    model: a `PixelLLM` module (models/pixel_llm.py).
    variables: its variables ({'params': ...}; a stale 'cache' entry is ignored).
    encoded: `Encoded` from `model.apply(variables, batch, method=PixelLLM.encode)`, holding
      `encoder_out float32[B, N, Le, D]` and `encoder_mask bool[B, N, Le]`.
    max_len: tokens generated at most per caption slot (static under jit).
    eos_id: the EOS id.

  Returns:
    `Decoded`. Points come from one extra teacher-forced decoder pass over [start] + tokens (no
    cache), so the point of the generated token tokens[t] is the head's output at decoder input
    position t + 1 (the hidden state that has just read tokens[t], as in pixelllm_jax/batch.py);
    the cached steps give the same values, but the last token would need a step past max_len.
    Points at positions after EOS belong to pad tokens and carry no meaning.

  Jit it with the model and max_len static, e.g.
  `jax.jit(greedy_decode_pixel_llm, static_argnums=(0, 3))`.
  """
  decode_method = type(model).decode
  batch_shape = tuple(encoded.encoder_mask.shape[:2])
  state = {name: value for name, value in variables.items() if name != "cache"}

  # flax wmt idiom: a call with decode=True on full-length tokens only allocates a zero cache.
  _, initial = model.apply(state, encoded, jnp.zeros((*batch_shape, max_len), jnp.int32),
                           decode=True, mutable=["cache"], method=decode_method)

  def decode_step(tokens_BxNx1, cache):
    out, updated = model.apply({**state, "cache": cache}, encoded, tokens_BxNx1, decode=True,
                               mutable=["cache"], method=decode_method)
    return out.logits[..., 0, :], updated["cache"]

  tokens = greedy_decode(decode_step, initial["cache"], batch_shape=batch_shape,
                         max_len=max_len, eos_id=eos_id, start_id=DECODER_START_ID)
  start = jnp.full((*batch_shape, 1), DECODER_START_ID, jnp.int32)
  out = model.apply(state, encoded, jnp.concatenate([start, tokens], axis=-1),
                    method=decode_method)
  return Decoded(tokens=tokens, points=out.points[..., 1:, :, :])
