"""Beam search with the KV cache and per-token points of the chosen beam.

`beam_search` is model-agnostic, like `decoding.greedy_decode`: it drives a
`step(tokens, cache) -> (logits, points, cache)` over `rows x beams` sequences inside one
`jax.lax.while_loop` (one trace, runs under jit). `beam_search_pixel_llm` adapts the PixelLLM
composer's cached `decode`.

The search (t5x's, which the official PixelLLM `auto_regressive_decode.py` uses, with one change):
- Two sets of `beam_size` hypotheses per row: alive ones (no EOS yet) ranked by their summed log
  probability, and finished ones ranked by the length-normalized score
  `sum log p / ((5 + n) / 6) ** alpha` with n the number of generated tokens, EOS included
  (GNMT's brevity penalty, alpha 0.6 in the official caption configs; 0 = plain sum).
- Each step extends every alive beam by every token and keeps the best `2 * beam_size`
  candidates: the best `beam_size` without EOS become the alive set (the cache rows are gathered
  from their parents); those ending in EOS compete with the finished set if they rank among the
  step's best `beam_size` (Hugging Face's rule; t5x lets any of the 2 * beam_size in). With
  t5x's rule one beam is not greedy decoding: an EOS that greedy would not pick can end the
  search early with a better score than the greedy sequence reaches later.
- It stops at `max_len` or once no alive beam can beat the worst finished one (the best alive
  beam's log probability, which can only fall, over the largest brevity divisor). A row that
  never finished returns its best alive beam, cut at max_len without EOS.
- Points: a token's points come from the step that reads it (the hidden state that has just
  read token t localizes token t, as in training), so the points of token t are produced at
  step t + 1, on the beam that holds token t, and travel with that beam's history when beams are
  reordered. The chosen beam's points are thus the ones computed while decoding it, never a
  second pass. EOS's own points are not needed (the box is read at the last word); a sequence
  cut at max_len gets its last token's points from one extra step.
Options: `suppress_repeat` clamps the logit of the token just fed to -10000 (the official GRiT
trick against immediate repetition); `rng` samples instead of maximizing (Gumbel top-k over the
candidates at `temperature`: with one beam, plain ancestral sampling).
With beam_size 1, alpha 0, no suppression and no sampling this is greedy decoding.
"""
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pixelllm_jax.batch import DECODER_START_ID, EOS_ID, PAD_ID

Cache = Any
# (tokens int32[R, 1], cache) -> (logits float[R, V], points float[R, ...] of the token fed, cache)
Step = Callable[[jax.Array, Cache], tuple[jax.Array, jax.Array, Cache]]
NEG_INF = -1.0e9
REPEAT_LOGIT = -1.0e4


class Beams(NamedTuple):
  tokens: jax.Array  # int32[rows, max_len]: the best sequence per row (words, EOS, pad)
  points: jax.Array  # float32[rows, max_len, ...]: points[r, t] localizes tokens[r, t]
  scores: jax.Array  # float32[rows]: its length-normalized score


def brevity(length: jax.Array, alpha: float) -> jax.Array:
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def gather_kv_rows(cache: Cache, rows: jax.Array) -> Cache:
  """Cache rows reordered: leaves shaped [..., R, S, H, K] (self- and cross-attention keys and
  values, with a leading layer axis when scanned) are gathered on R; counters are kept."""
  def take(x):
    return jnp.take(x, rows, axis=x.ndim - 4) if x.ndim >= 4 else x
  return jax.tree.map(take, cache)


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[r, index[r, k]] for x [rows, beams, ...] and index [rows, k]."""
  return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


def beam_search(step: Step, cache: Cache, *, rows: int, beam_size: int, max_len: int,
                point_shape: tuple[int, ...], alpha: float = 0.0, suppress_repeat: bool = False,
                rng: jax.Array | None = None, temperature: float = 1.0, eos_id: int = EOS_ID,
                start_id: int = DECODER_START_ID,
                gather_cache: Callable[[Cache, jax.Array], Cache] = gather_kv_rows) -> Beams:
  """Beam search over `rows` independent sequences (see the module docstring).

  `cache` holds rows * beam_size rows (row r, beam w at r * beam_size + w), sized for
  max_len + 1 steps; `point_shape` is the shape of one token's points (e.g. (P, 2)).
  """
  w, length = beam_size, max_len
  row_index = jnp.arange(rows)[:, None] * w

  def body(state):
    s, alive, logp, pts, last, fin, fin_pts, fin_score, cache, done = state
    logits, fed_points, cache = step(last.reshape(rows * w, 1), cache)
    logits = logits.astype(jnp.float32).reshape(rows, w, -1)
    # Points of the token just fed (token s - 1 of each alive beam).
    fed_points = fed_points.reshape(rows, w, *point_shape)
    pts = jnp.where((s >= 1) & (jnp.arange(length) == s - 1)[..., *(None,) * len(point_shape)],
                    fed_points[:, :, None], pts)
    if suppress_repeat:
      repeat = jax.nn.one_hot(last, logits.shape[-1], dtype=bool) & (s >= 1)
      logits = jnp.where(repeat, jnp.minimum(logits, REPEAT_LOGIT), logits)
    vocab = logits.shape[-1]
    cand = (logp[..., None] + jax.nn.log_softmax(logits, axis=-1)).reshape(rows, w * vocab)
    pick = cand
    if rng is not None:
      gumbel = jax.random.gumbel(jax.random.fold_in(rng, s), cand.shape)
      pick = jnp.where(cand > NEG_INF / 2, cand / temperature + gumbel, cand)
    _, top = jax.lax.top_k(pick, 2 * w)                     # [rows, 2w]
    top_score = jnp.take_along_axis(cand, top, axis=1)
    parent, token = top // vocab, (top % vocab).astype(jnp.int32)
    cand_seq = _take(alive, parent)
    cand_seq = jnp.where(jnp.arange(length) == s, token[..., None], cand_seq)
    cand_pts = _take(pts, parent)
    is_eos = token == eos_id

    # Alive: the best w candidates that did not end (ranked as picked: sampled or not).
    _, keep = jax.lax.top_k(jnp.where(is_eos, NEG_INF, jnp.take_along_axis(pick, top, axis=1)), w)
    alive_score = jnp.where(is_eos, NEG_INF, top_score)
    new_alive, new_logp = _take(cand_seq, keep), jnp.take_along_axis(alive_score, keep, axis=1)
    new_pts, new_last = _take(cand_pts, keep), jnp.take_along_axis(token, keep, axis=1)
    new_cache = gather_cache(cache, (row_index + jnp.take_along_axis(parent, keep, axis=1))
                             .reshape(-1))

    # Finished: candidates that emitted EOS *among the step's best w* join the finished set
    # (an EOS ranked lower would never have been chosen with w beams), the best w stay.
    ended = jnp.where(is_eos & (jnp.arange(2 * w) < w), top_score / brevity(s + 1, alpha),
                      NEG_INF)
    all_score = jnp.concatenate([fin_score, ended], axis=1)
    _, best = jax.lax.top_k(all_score, w)
    new_fin = _take(jnp.concatenate([fin, cand_seq], axis=1), best)
    new_fin_pts = _take(jnp.concatenate([fin_pts, cand_pts], axis=1), best)
    new_fin_score = jnp.take_along_axis(all_score, best, axis=1)

    # Done: every finished slot beats what any alive beam can still reach.
    best_reachable = new_logp[:, 0] / brevity(jnp.asarray(length), alpha)
    new_done = jnp.all(new_fin_score > NEG_INF / 2, axis=1) & (
        new_fin_score[:, -1] >= best_reachable)
    searching = s < length
    keep_old = lambda new, old: jnp.where(searching, new, old)  # noqa: E731
    # At s == max_len the step only read the last tokens' points.
    return (s + 1, keep_old(new_alive, alive), keep_old(new_logp, logp),
            keep_old(new_pts, pts), keep_old(new_last, last), keep_old(new_fin, fin),
            keep_old(new_fin_pts, fin_pts), keep_old(new_fin_score, fin_score),
            jax.tree.map(keep_old, new_cache, cache), done | (searching & new_done))

  def not_done(state):
    s, done = state[0], state[-1]
    return (s <= length) & ~jnp.all(done)

  init_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (w - 1), jnp.float32), (rows, 1))
  seq0 = jnp.full((rows, w, length), PAD_ID, jnp.int32)
  pts0 = jnp.zeros((rows, w, length, *point_shape), jnp.float32)
  state = (jnp.array(0, jnp.int32), seq0, init_logp, pts0,
           jnp.full((rows, w), start_id, jnp.int32), seq0, pts0,
           jnp.full((rows, w), NEG_INF, jnp.float32), cache, jnp.zeros((rows,), bool))
  _, alive, logp, pts, _, fin, fin_pts, fin_score, _, _ = jax.lax.while_loop(
      not_done, body, state)
  any_fin = fin_score[:, 0] > NEG_INF / 2
  return Beams(
      tokens=jnp.where(any_fin[:, None], fin[:, 0], alive[:, 0]),
      points=jnp.where(any_fin[:, None, *(None,) * len(point_shape)], fin_pts[:, 0], pts[:, 0]),
      scores=jnp.where(any_fin, fin_score[:, 0], logp[:, 0] / brevity(jnp.asarray(length), alpha)))


def beam_search_pixel_llm(model, variables, encoded, max_len: int, *, beam_size: int,
                          alpha: float = 0.0, suppress_repeat: bool = False,
                          rng: jax.Array | None = None, temperature: float = 1.0,
                          eos_id: int = EOS_ID) -> Beams:
  """Beam search on every caption slot of the PixelLLM composer.

  `encoded`: `Encoded` with encoder_out [B, N, Le, D]; each slot's encoder side is repeated
  beam_size times (slots become B x N*beam_size sequences for the composer's cached `decode`).
  Returns `Beams` shaped [B, N, max_len] (points [B, N, max_len, P, 2], scores [B, N]).
  Jit with the model, max_len and the options static.
  """
  decode_method = type(model).decode
  b, n = encoded.encoder_mask.shape[:2]
  w = beam_size
  state = {name: value for name, value in variables.items() if name != "cache"}
  tiled = jax.tree.map(lambda x: jnp.repeat(x, w, axis=1), encoded)
  # The cache is sized for max_len + 1 steps: the extra one reads a cut sequence's last token.
  _, initial = model.apply(state, tiled, jnp.zeros((b, n * w, max_len + 1), jnp.int32),
                           decode=True, mutable=["cache"], method=decode_method)

  def step(tokens_Rx1, cache):
    out, updated = model.apply({**state, "cache": cache}, tiled, tokens_Rx1.reshape(b, n * w, 1),
                               decode=True, mutable=["cache"], method=decode_method)
    return (out.logits.reshape(b * n * w, -1), out.points.reshape(b * n * w, *out.points.shape[-2:]),
            updated["cache"])

  p = jax.eval_shape(lambda: model.apply(state, tiled, jnp.zeros((b, n * w, 1), jnp.int32),
                                         method=decode_method)).points.shape[-2:]
  beams = beam_search(step, initial["cache"], rows=b * n, beam_size=w, max_len=max_len,
                      point_shape=tuple(p), alpha=alpha, suppress_repeat=suppress_repeat, rng=rng,
                      temperature=temperature, eos_id=eos_id)
  return Beams(tokens=beams.tokens.reshape(b, n, max_len),
               points=beams.points.reshape(b, n, max_len, *p),
               scores=beams.scores.reshape(b, n))
