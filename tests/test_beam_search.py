"""Beam search (pixelllm_jax/beam_search.py): hand-checked cases on Markov tables, width 1 ==
greedy, the cache == re-running the model over the prefix on the toy composer, the chosen beam's
points, repetition suppression and sampling."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_fixtures as mf
from pixelllm_jax import beam_search as bs
from pixelllm_jax import decoding
from pixelllm_jax.model import DecodeSettings, PixelLLMModel
from pixelllm_jax.models.pixel_llm import PixelLLM

PAD, EOS, A, B = 0, 1, 2, 3  # the start token is 0 too: table row 0 is "after start"


def table_step(log_probs):
  """A Markov model: the next token's log probabilities depend only on the token fed; its
  'points' are (token fed, step) so alignment is visible; the cache counts steps."""
  table = jnp.asarray(log_probs, jnp.float32)

  def step(tokens_Rx1, cache):
    tok = tokens_Rx1[:, 0]
    points = jnp.stack([tok.astype(jnp.float32), jnp.full(tok.shape, cache["n"], jnp.float32)],
                       -1)[:, None, :]
    return table[tok], points, {"n": cache["n"] + 1}
  return step


def _search(log_probs, rows=1, **kw):
  kw = {"beam_size": 2, "max_len": 4, **kw}
  return jax.jit(lambda: bs.beam_search(table_step(log_probs), {"n": jnp.array(0)}, rows=rows,
                                        point_shape=(1, 2), **kw))()


def _table(after_start, after_a, after_b, after_eos=(0, 1, 0, 0)):
  rows = [after_start, after_eos, after_a, after_b]
  return np.log(np.maximum(np.asarray(rows, np.float64), 1e-12))


# After start: a 0.6, b 0.4. After a: eos 0.34, a 0.33, b 0.33. After b: eos 0.9.
HAND = _table((0, 0, 0.6, 0.4), (0, 0.34, 0.33, 0.33), (0, 0.9, 0.05, 0.05))


def test_beam_finds_the_better_sequence_greedy_misses():
  # Greedy: a (0.6), then eos (0.34): p = 0.204. Beam 2 also keeps b (0.4), then eos (0.9):
  # p = 0.36 > 0.204, so it returns [b, eos] with score log 0.36 (alpha 0: no brevity term).
  greedy = decoding.greedy_decode(lambda t, c: (table_step(HAND)(t, c)[0], c), {"n": jnp.array(0)},
                                  batch_shape=(1,), max_len=4)
  np.testing.assert_array_equal(greedy[0], [A, EOS, PAD, PAD])
  beams = _search(HAND, beam_size=2)
  np.testing.assert_array_equal(beams.tokens[0], [B, EOS, PAD, PAD])
  np.testing.assert_allclose(beams.scores[0], np.log(0.36), rtol=1e-5)
  width1 = _search(HAND, beam_size=1)
  np.testing.assert_array_equal(width1.tokens[0], [A, EOS, PAD, PAD])
  np.testing.assert_allclose(width1.scores[0], np.log(0.204), rtol=1e-5)
  # Points of token t come from the step that read it (step t + 1), on its own beam.
  np.testing.assert_allclose(beams.points[0, 0, 0], [B, 1])


def test_length_penalty_prefers_longer_sequences():
  # After start: eos 0.52, a 0.48; after a: eos 0.99 (p([a, eos]) = 0.4752).
  log_probs = _table((0, 0.52, 0.48, 0), (0, 0.99, 0.01, 0), (0, 1, 0, 0))
  # alpha 0: [eos] (log 0.52 = -0.654) beats [a, eos] (log 0.4752 = -0.744).
  np.testing.assert_array_equal(_search(log_probs, alpha=0.0).tokens[0], [EOS, PAD, PAD, PAD])
  # alpha 1: -0.654 / ((5 + 1) / 6) = -0.654 vs -0.744 / ((5 + 2) / 6) = -0.638: longer wins.
  long = _search(log_probs, alpha=1.0)
  np.testing.assert_array_equal(long.tokens[0], [A, EOS, PAD, PAD])
  np.testing.assert_allclose(long.scores[0], np.log(0.4752) / (7 / 6), rtol=1e-5)


def test_width_one_equals_greedy_on_random_tables():
  r = np.random.RandomState(0)
  for seed in range(5):
    logits = r.randn(6, 6).astype(np.float32) * 3
    logits[:, PAD] = -1e4  # no real model emits pad (greedy would never stop)
    rows = 3
    step = table_step(jax.nn.log_softmax(jnp.asarray(logits)))
    greedy = decoding.greedy_decode(lambda t, c: (step(t, c)[0], c), {"n": jnp.array(0)},
                                    batch_shape=(rows,), max_len=5)
    beams = bs.beam_search(step, {"n": jnp.array(0)}, rows=rows, beam_size=1, max_len=5,
                           point_shape=(1, 2))
    np.testing.assert_array_equal(beams.tokens, greedy, err_msg=f"seed {seed}")


def test_a_sequence_cut_at_max_len_gets_its_last_points():
  forever = _table((0, 0, 1, 0), (0, 0, 0, 1), (0, 0, 0, 1))  # a, b, b, b, ... never EOS
  beams = _search(forever, beam_size=1, max_len=3)
  np.testing.assert_array_equal(beams.tokens[0], [A, B, B])
  np.testing.assert_allclose(beams.points[0, :, 0], [[A, 1], [B, 2], [B, 3]])


def test_repetition_suppression():
  sticky = _table((0, 0, 1, 0), (0, 0.15, 0.8, 0.05), (0, 0.5, 0.1, 0.4))  # a likes to repeat
  plain = _search(sticky, beam_size=1, max_len=4)
  np.testing.assert_array_equal(plain.tokens[0], [A, A, A, A])
  suppressed = _search(sticky, beam_size=1, max_len=4, suppress_repeat=True)
  tokens = np.asarray(suppressed.tokens[0])
  assert not np.any((tokens[1:] == tokens[:-1]) & (tokens[1:] > EOS)), tokens
  np.testing.assert_array_equal(tokens[:2], [A, EOS])


def test_sampling_follows_the_distribution():
  # One beam: the first token is drawn with p(a) = 0.6, p(b) = 0.4 (then EOS surely).
  log_probs = _table((0, 0, 0.6, 0.4), (0, 1, 0, 0), (0, 1, 0, 0))
  rows = 4000
  beams = _search(log_probs, rows=rows, beam_size=1, max_len=2, rng=jax.random.key(7))
  share_a = float(np.mean(np.asarray(beams.tokens[:, 0]) == A))
  assert abs(share_a - 0.6) < 4 * np.sqrt(0.24 / rows), share_a  # 4 sigma
  again = _search(log_probs, rows=rows, beam_size=1, max_len=2, rng=jax.random.key(7))
  np.testing.assert_array_equal(beams.tokens, again.tokens)


# ---------------------------------------------------------------- on the toy PixelLLM composer

@pytest.fixture(scope="module")
def toy():
  model = PixelLLMModel(mf.toy_config(lora_rank=2))
  batch = mf.random_batch(0, b=2, n=2)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch))
  encoded = jax.jit(lambda p: model.module.apply({"params": p}, **mf.encode_inputs(batch),
                                                 method=PixelLLM.encode))(params)
  return model, params, encoded


def _recompute_search(model, params, encoded, max_len, beam_size):
  """Beam search whose step re-runs the decoder over the whole prefix (no KV cache)."""
  b, n = encoded.encoder_mask.shape[:2]
  tiled = jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=1), encoded)

  def step(tokens_Rx1, cache):
    history, pos = cache["history"], cache["pos"]
    history = history.at[:, pos].set(tokens_Rx1[:, 0])
    out = model.module.apply({"params": params}, tiled,
                             history.reshape(b, n * beam_size, -1), method=PixelLLM.decode)
    logits = out.logits.reshape(b * n * beam_size, max_len + 1, -1)[:, pos]
    points = out.points.reshape(b * n * beam_size, max_len + 1, *out.points.shape[-2:])[:, pos]
    return logits, points, {"history": history, "pos": pos + 1}

  cache = {"history": jnp.zeros((b * n * beam_size, max_len + 1), jnp.int32),
           "pos": jnp.array(0)}
  beams = bs.beam_search(step, cache, rows=b * n, beam_size=beam_size, max_len=max_len,
                         point_shape=(mf.POINTS, 2),
                         gather_cache=lambda c, rows: {**c, "history": c["history"][rows]})
  return jax.tree.map(lambda x: x.reshape(b, n, *x.shape[1:]), beams)


def test_cached_beam_search_equals_recomputing_the_prefix(toy):
  model, params, encoded = toy
  max_len, width = 5, 3
  cached = jax.jit(bs.beam_search_pixel_llm, static_argnums=(0, 3),
                   static_argnames=("beam_size",))(model.module, {"params": params}, encoded,
                                                   max_len, beam_size=width)
  slow = jax.jit(_recompute_search, static_argnums=(0, 3, 4))(model, params, encoded, max_len,
                                                              width)
  np.testing.assert_array_equal(cached.tokens, slow.tokens)
  np.testing.assert_allclose(cached.scores, slow.scores, atol=1e-5)
  np.testing.assert_allclose(cached.points, slow.points, atol=1e-5)
  # And the chosen beam's points are the teacher-forced points of its own tokens.
  start = jnp.zeros((*cached.tokens.shape[:2], 1), jnp.int32)
  forced = model.module.apply({"params": params}, encoded,
                              jnp.concatenate([start, cached.tokens], -1), method=PixelLLM.decode)
  ends = np.argmax(np.asarray(cached.tokens) == 1, axis=-1)
  for i, j in np.ndindex(*ends.shape):
    last = ends[i, j] if np.any(np.asarray(cached.tokens[i, j]) == 1) else max_len
    np.testing.assert_allclose(cached.points[i, j, :last], forced.points[i, j, 1:last + 1],
                               atol=1e-5)


def test_predict_in_beam_mode(toy):
  """DecodeSettings('beam') through the model API: one beam is the greedy prediction; three
  beams give well-formed predictions."""
  model, params, _ = toy
  batch = mf.random_batch(0, b=2, n=2)
  predict = jax.jit(model.predict, static_argnums=2)
  greedy = predict(params, batch, DecodeSettings("greedy", max_len=5))
  one = predict(params, batch, DecodeSettings("beam", max_len=5, beam_size=1))
  np.testing.assert_array_equal(one.tokens, greedy.tokens)
  np.testing.assert_allclose(one.boxes, greedy.boxes, atol=1e-5)
  three = predict(params, batch, DecodeSettings("beam", max_len=5, beam_size=3))
  assert three.tokens.shape == greedy.tokens.shape and three.boxes.shape == greedy.boxes.shape
  with pytest.raises(ValueError, match="beam_size"):
    DecodeSettings("greedy", beam_size=3)


def test_predict_samples_when_given_a_seed(toy):
  """DecodeSettings.sample_seed through the model API: the same seed samples the same tokens,
  a near-zero temperature is greedy, a hot one departs from it."""
  model, params, _ = toy
  batch = mf.random_batch(0, b=2, n=2)
  predict = jax.jit(model.predict, static_argnums=2)
  greedy = predict(params, batch, DecodeSettings("greedy", max_len=5))
  cold = predict(params, batch, DecodeSettings("greedy", max_len=5, sample_seed=0,
                                               temperature=1e-4))
  np.testing.assert_array_equal(cold.tokens, greedy.tokens)
  hot = [predict(params, batch, DecodeSettings("greedy", max_len=5, sample_seed=seed,
                                               temperature=5.0)) for seed in (0, 0, 1)]
  np.testing.assert_array_equal(hot[0].tokens, hot[1].tokens)
  assert (np.asarray(hot[0].tokens) != np.asarray(greedy.tokens)).any()
  assert (np.asarray(hot[0].tokens) != np.asarray(hot[2].tokens)).any()
  with pytest.raises(ValueError, match="sample_seed"):
    DecodeSettings("teacher_forced", sample_seed=0)
