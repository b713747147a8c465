"""Greedy decoding: the generic loop against lookup-table models, the PixelLLM adapter on a stand-in.

The table model: at step s a row that has just read token `prev` predicts table[s, prev]. The step
index comes from the cache, so a loop that threads the cache wrongly produces different tokens.
"""
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelllm_jax import decoding
from pixelllm_jax.batch import Output

VOCAB = 6
EOS = decoding.EOS_ID


def table_step(table):
  """decode_step for a table int[S, V]: next token = table[step, prev], step read from the cache."""
  table = jnp.asarray(table)

  def step(tokens, cache):
    prev = tokens[..., 0]
    logits = jax.nn.one_hot(table[cache["step"], prev], VOCAB) * 5.0
    return logits, {"step": cache["step"] + 1}

  return step


def naive_greedy(table, max_len):
  """Reference for one row: a Python loop over table int[S, V] that breaks at EOS."""
  out = np.zeros(max_len, np.int32)
  prev = decoding.DECODER_START_ID
  for t in range(max_len):
    prev = int(table[t, prev])
    out[t] = prev
    if prev == EOS:
      break
  return out


def chain_table(chain, max_len):
  """A table that emits `chain` whatever it reads: table[t, :] = chain[t]."""
  return np.repeat(np.asarray(chain)[:max_len, None], VOCAB, axis=1)


def test_stops_at_eos_and_pads_after():
  table = chain_table([3, 4, EOS, 5, 5, 5], 6)
  tokens = decoding.greedy_decode(table_step(table), {"step": jnp.array(0)}, batch_shape=(2,),
                                  max_len=6)
  np.testing.assert_array_equal(tokens, [[3, 4, EOS, 0, 0, 0]] * 2)
  assert tokens.dtype == jnp.int32


def test_cut_at_max_len_without_eos():
  table = chain_table([3, 4, 5, 2, 3, EOS], 6)
  tokens = decoding.greedy_decode(table_step(table), {"step": jnp.array(0)}, batch_shape=(1,),
                                  max_len=4)
  np.testing.assert_array_equal(tokens, [[3, 4, 5, 2]])


def test_loop_stops_once_every_row_is_done():
  max_len = 8
  table = np.full((max_len, VOCAB), 3)
  table[:, 0] = 2      # start -> 2
  table[:, 2] = EOS    # 2 -> EOS: every row is finished after 2 tokens
  calls = []

  def counting_step(tokens, cache):
    calls.append(1)
    return table_step(table)(tokens, cache)

  with jax.disable_jit():  # while_loop runs as a Python loop, so calls are counted exactly
    tokens = decoding.greedy_decode(counting_step, {"step": jnp.array(0)}, batch_shape=(3,),
                                    max_len=max_len)
  np.testing.assert_array_equal(tokens, [[2, EOS, 0, 0, 0, 0, 0, 0]] * 3)
  assert len(calls) == 2  # not max_len steps


def test_rows_finish_at_different_steps():
  # Row r emits (chain[step] + offset[r]) % V: row 0 stops at step 1, row 1 at step 2.
  table = jnp.asarray(chain_table([2, EOS, 5, 5, 5], 5))
  offsets = jnp.array([0, 2])

  def step(tokens, cache):
    next_token = (table[cache["step"], tokens[..., 0]] + offsets) % VOCAB
    return jax.nn.one_hot(next_token, VOCAB), {"step": cache["step"] + 1}

  tokens = decoding.greedy_decode(step, {"step": jnp.array(0)}, batch_shape=(2,), max_len=5)
  # Row 0 would go on emitting 5 after its EOS; those positions must be pad.
  np.testing.assert_array_equal(tokens, [[2, EOS, 0, 0, 0], [4, 3, EOS, 0, 0]])


def test_equals_naive_loop_on_random_tables_under_jit():
  """Each of the 2 x 3 rows follows its own random table, so rows stop at different steps."""
  rng = np.random.default_rng(0)
  max_len = 7

  def step(tables_2x3xSxV, tokens, cache):
    rows = jnp.take_along_axis(tables_2x3xSxV[:, :, cache["step"]], tokens, axis=-1)[..., 0]
    return jax.nn.one_hot(rows, VOCAB), {"step": cache["step"] + 1}

  decode = jax.jit(lambda tables: decoding.greedy_decode(
      lambda tokens, cache: step(tables, tokens, cache), {"step": jnp.array(0)},
      batch_shape=(2, 3), max_len=max_len))
  expected_rows = []
  for _ in range(4):
    tables = rng.integers(0, VOCAB, size=(2, 3, max_len, VOCAB))
    tokens = np.asarray(decode(tables))
    expected = np.array([[naive_greedy(tables[b, n], max_len) for n in range(3)] for b in range(2)])
    np.testing.assert_array_equal(tokens, expected)
    expected_rows.extend(expected.reshape(-1, max_len))
  # Both regimes were exercised: rows that stop early and rows cut at max_len.
  assert any(EOS in row[:-1] for row in expected_rows)
  assert any(EOS not in row for row in expected_rows)


def test_rejects_logits_of_wrong_shape():
  def bad_step(tokens, cache):
    return jnp.zeros((1, VOCAB)), cache

  with pytest.raises(ValueError, match="logits"):
    decoding.greedy_decode(bad_step, {"step": jnp.array(0)}, batch_shape=(2,), max_len=3)


# ------------------------------------------------- the PixelLLM adapter, on a stand-in composer

@flax.struct.dataclass
class FakeEncoded:
  encoder_out: jax.Array   # float32[B, N, Le, D]; [..., 0, 0] holds each slot's token limit
  encoder_mask: jax.Array  # bool[B, N, Le]


class FakeComposer(nn.Module):
  """Stands in for PixelLLM.decode with the documented cache protocol.

  At position p a slot predicts p + 2, or EOS once it has read a token >= its limit; so correct
  tokens need the position from a correctly threaded cache. Each position's two points are
  (token fed / 10, position / 10), which pins down the alignment of points to tokens.
  """

  @nn.compact
  def decode(self, encoded, tokens, decode=False):
    bias = self.param("bias", nn.initializers.zeros, (10,))
    positions = jnp.arange(tokens.shape[-1])
    if decode:
      initialized = self.has_variable("cache", "index")
      index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
      if initialized:  # the first call only allocates the cache (flax wmt idiom)
        positions = positions + index.value
        index.value = index.value + tokens.shape[-1]
    limit = encoded.encoder_out[..., 0, 0, None].astype(jnp.int32)
    next_token = jnp.where(tokens >= limit, EOS, positions + 2)
    logits = jax.nn.one_hot(next_token, 10) + bias
    xy = jnp.stack([tokens / 10, jnp.broadcast_to(positions / 10, tokens.shape)], axis=-1)
    points = jnp.repeat(xy[..., None, :], 2, axis=-2)
    return Output(logits=logits, points=points, hidden=jnp.zeros((*tokens.shape, 1)))


def test_pixel_llm_adapter_on_stand_in_composer():
  limits = jnp.array([3.0, 5.0, 9.0]).reshape(1, 3, 1, 1)
  encoded = FakeEncoded(encoder_out=jnp.broadcast_to(limits, (1, 3, 4, 1)),
                        encoder_mask=jnp.ones((1, 3, 4), bool))
  model = FakeComposer()
  variables = model.init(jax.random.key(0), encoded, jnp.zeros((1, 3, 5), jnp.int32),
                         method=FakeComposer.decode)
  decode = jax.jit(decoding.greedy_decode_pixel_llm, static_argnums=(0, 3))
  tokens, points = decode(model, variables, encoded, 5)
  np.testing.assert_array_equal(tokens, [[[2, 3, EOS, 0, 0], [2, 3, 4, 5, EOS], [2, 3, 4, 5, 6]]])
  assert points.shape == (1, 3, 5, 2, 2)
  # tokens[t] is localized by the hidden state that read it: decoder input position t + 1.
  np.testing.assert_allclose(points[..., 0, 0], tokens / 10, atol=1e-6)
  np.testing.assert_allclose(points[..., 0, 1], np.broadcast_to(np.arange(1, 6) / 10, (1, 3, 5)),
                             atol=1e-6)
