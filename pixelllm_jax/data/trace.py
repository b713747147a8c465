"""Localized Narratives trace math: utterance boxes/points and token alignment.

Follows the official PixelLLM preprocessing (docs/DESIGN.md, "Tasks"):

- Offline (`utterance_boxes_and_points`): all trace segments of a narrative
  are concatenated and sorted by time; x(t), y(t) are linearly interpolated;
  each timed utterance is sampled at `NUM_SAMPLES` evenly spaced times in
  [start, end]. Its box is the min/max of the samples, its point the time
  average of the samples (trapezoid integral / duration, the plain mean when
  the duration is ~0).
- Online (`assign_utterances_to_tokens`): utterances are matched to sub-word
  tokens by relative position in the sequence, not by string matching.

Choices where the official description leaves room:
- Outside the trace's time range the trace is *linearly extrapolated* from the
  first (last) two distinct time stamps, as the official tool does; points
  with equal time stamps are averaged first so every slope is defined. A trace
  with a single distinct time is constant.
- Samples are clipped to [0, 1] *before* the box and the average are taken,
  so the point always lies inside the image (LN coordinates may stray
  slightly outside [0, 1]; extrapolation can stray further).
"""
from typing import Any, Sequence

import numpy as np

NUM_SAMPLES = 16
_MIN_DURATION = 1e-6  # seconds; below this the time average is the plain mean
# An utterance whose time-averaged point has no coordinate above this is
# treated as missing (the official `center > 1e-5` check).
_MIN_POINT = 1e-5


def trace_array(traces: Sequence[Sequence[dict[str, Any]]]) -> np.ndarray:
  """float32[T, 3] (x, y, t): LN `traces` segments concatenated, time-sorted.

  Raises ValueError (naming the segment and point) on a point lacking a
  numeric x, y or t, and when there are no points at all.
  """
  rows = []
  for s, segment in enumerate(traces):
    for p, point in enumerate(segment):
      try:
        rows.append((float(point["x"]), float(point["y"]), float(point["t"])))
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"trace segment {s} point {p} is not {{x, y, t}}: {point!r}") from e
  if not rows:
    raise ValueError("trace has no points")
  trace_Tx3 = np.asarray(rows, np.float64)
  if not np.all(np.isfinite(trace_Tx3)):
    raise ValueError("trace has non-finite values")
  order = np.argsort(trace_Tx3[:, 2], kind="stable")
  return trace_Tx3[order].astype(np.float32)


def interpolate(trace_Tx3: np.ndarray, times_S: np.ndarray) -> np.ndarray:
  """float64[S, 2]: x(t), y(t) of a time-sorted trace at `times_S`, unclipped.

  Linear between trace points, linearly extrapolated beyond either end (see
  the module docstring).
  """
  trace_Tx3 = np.asarray(trace_Tx3, np.float64)
  times_S = np.asarray(times_S, np.float64)
  t_U, inverse = np.unique(trace_Tx3[:, 2], return_inverse=True)
  counts_U = np.bincount(inverse, minlength=len(t_U))
  xy_Ux2 = np.stack([np.bincount(inverse, trace_Tx3[:, c], len(t_U)) / counts_U
                     for c in (0, 1)], axis=-1)
  if len(t_U) == 1:
    return np.broadcast_to(xy_Ux2[0], (len(times_S), 2)).copy()
  out_Sx2 = np.stack([np.interp(times_S, t_U, xy_Ux2[:, c]) for c in (0, 1)], axis=-1)
  for end, nxt in ((0, 1), (-1, -2)):
    outside = times_S < t_U[0] if end == 0 else times_S > t_U[-1]
    slope_2 = (xy_Ux2[nxt] - xy_Ux2[end]) / (t_U[nxt] - t_U[end])
    out_Sx2[outside] = xy_Ux2[end] + (times_S[outside, None] - t_U[end]) * slope_2
  return out_Sx2


def _time_average(samples_Sx2: np.ndarray, start: float, end: float) -> np.ndarray:
  """Trapezoid integral of evenly spaced samples over [start, end] / duration."""
  duration = end - start
  if duration < _MIN_DURATION:
    return samples_Sx2.mean(axis=0)
  dt = duration / (len(samples_Sx2) - 1)
  integral_2 = ((samples_Sx2[1:] + samples_Sx2[:-1]) * 0.5 * dt).sum(axis=0)
  return integral_2 / duration


def utterance_boxes_and_points(
    traces: Sequence[Sequence[dict[str, Any]]] | np.ndarray,
    timed_caption: Sequence[dict[str, Any]],
) -> tuple[np.ndarray, np.ndarray]:
  """Per timed utterance: its trace box and its time-averaged trace point.

  Args:
    traces: LN `traces` (segments of {x, y, t}) or a `trace_array` result.
    timed_caption: LN `timed_caption`: [{utterance, start_time, end_time}].

  Returns:
    boxes float32[U, 4] (x0, y0, x1, y1) and points float32[U, 2] (x, y), in
    [0, 1].

  Raises ValueError (naming the utterance) on missing or non-finite times or
  an end before the start, and on a malformed or empty trace.
  """
  trace_Tx3 = np.asarray(traces, np.float32) if isinstance(traces, np.ndarray) else trace_array(traces)
  trace_Tx3 = trace_Tx3[np.argsort(trace_Tx3[:, 2], kind="stable")]
  if len(trace_Tx3) == 0:
    raise ValueError("trace has no points")
  boxes, points = [], []
  for u, item in enumerate(timed_caption):
    try:
      start, end = float(item["start_time"]), float(item["end_time"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"utterance {u} lacks numeric start_time/end_time: {item!r}") from e
    if not (np.isfinite(start) and np.isfinite(end)) or end < start:
      raise ValueError(f"utterance {u} has bad times [{start}, {end}]")
    samples_Sx2 = np.clip(interpolate(trace_Tx3, np.linspace(start, end, NUM_SAMPLES)), 0.0, 1.0)
    boxes.append(np.concatenate([samples_Sx2.min(axis=0), samples_Sx2.max(axis=0)]))
    points.append(_time_average(samples_Sx2, start, end))
  boxes_Ux4 = np.asarray(boxes, np.float32).reshape(-1, 4)
  points_Ux2 = np.asarray(points, np.float32).reshape(-1, 2)
  return boxes_Ux4, points_Ux2


def assign_utterances_to_tokens(num_tokens: int, utterance_valid: Sequence[bool]) -> np.ndarray:
  """int32[num_tokens]: the utterance index each caption token takes.

  Official relative-position matching: valid utterance j (in order) sits at
  cumsum(valid)/sum(valid), i.e. in (0, 1]; token k sits at (k + 1) /
  num_tokens, linearly rescaled into [first utterance position, last
  utterance position]; each token takes the valid utterance nearest in
  position (the earlier one on a tie). Indices refer to the full utterance
  list, invalid ones included; all -1 when no utterance is valid. The result
  is non-decreasing, and with as many tokens as valid utterances the mapping
  is 1:1 in order.

  `num_tokens` counts the caption's real tokens only (no BOS/EOS/padding).
  """
  if num_tokens < 0:
    raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
  valid_U = np.asarray(utterance_valid, bool).reshape(-1)
  valid_idx = np.flatnonzero(valid_U)
  if len(valid_idx) == 0 or num_tokens == 0:
    return np.full((num_tokens,), -1, np.int32)
  utt_pos_V = np.arange(1, len(valid_idx) + 1) / len(valid_idx)
  tok_pos_N = np.arange(1, num_tokens + 1) / num_tokens
  lo, hi = utt_pos_V[0], utt_pos_V[-1]
  if num_tokens == 1:
    tok_pos_N = np.array([lo])
  else:
    frac_N = (tok_pos_N - tok_pos_N[0]) / (tok_pos_N[-1] - tok_pos_N[0])
    tok_pos_N = lo + frac_N * (hi - lo)
  nearest_N = np.argmin((tok_pos_N[:, None] - utt_pos_V[None, :]) ** 2, axis=1)
  return valid_idx[nearest_N].astype(np.int32)


def utterance_valid(record: dict) -> np.ndarray:
  """bool[U]: non-empty utterances of a builder record whose time-averaged point is not missing.

  An augmented record carries `utterance_valid` (decided before its points
  moved: a point moved to (0, 0) by a crop is not "missing"), used as is.
  """
  if "utterance_valid" in record:
    return np.asarray(record["utterance_valid"], bool).reshape(len(record["utterances"]))
  words = [(u.decode("utf-8") if isinstance(u, bytes) else str(u)).strip()
           for u in record["utterances"]]
  points = np.asarray(record["utterance_points"], np.float32).reshape(len(words), 2)
  finite = np.isfinite(points).all(-1)
  return np.array([bool(w) for w in words], bool) & finite & (points.max(-1, initial=0) > _MIN_POINT)
